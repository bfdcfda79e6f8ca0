"""A deterministic procedural scene of analytic, textured, shaded primitives with exact ground truth.

Primitives are posed by a rotation and a centre; each answers ray intersections (``intersect``) and
signed distance (``sdf``), so any later format (LLFF, NeuS, meshes, point clouds, depth maps) is a
small writer on top of :class:`Scene`. Shading is Lambertian under one directional light plus ambient,
so colour does not depend on the view. Everything is float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LIGHT_DIR = torch.tensor([0.35, 0.25, 0.9], dtype=torch.float64)
AMBIENT = 0.35


def rotation_xyz(angles_deg: tuple[float, float, float]) -> torch.Tensor:
    """R = Rz @ Ry @ Rx for Euler angles in degrees."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


@dataclass
class Primitive:
    """``kind`` in sphere | box | cylinder; ``size``: radius | half-extents | (radius, half-height)."""

    kind: str
    center: tuple[float, float, float]
    size: tuple[float, ...]
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    pattern: str  # checker | cube_checker | stripes
    frequency: float
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    R: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.R = rotation_xyz(self.rotation_deg)

    def to_local(self, x: torch.Tensor) -> torch.Tensor:
        return (x - torch.tensor(self.center, dtype=x.dtype)) @ self.R.to(x.dtype)

    def intersect(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest positive hit ``t`` (N,) (inf where missed) and the local-frame normal (N, 3)."""
        o, d = self.to_local(rays_o), rays_d @ self.R
        hit_fn = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}[self.kind]
        return hit_fn(o, d, self.size)

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        p = self.to_local(x)
        if self.kind == "sphere":
            return p.norm(dim=-1) - self.size[0]
        if self.kind == "box":
            q = p.abs() - torch.tensor(self.size, dtype=p.dtype)
            return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)
        radius, half_h = self.size
        q = torch.stack([p[:, :2].norm(dim=-1) - radius, p[:, 2].abs() - half_h], -1)
        return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)

    def area(self) -> float:
        if self.kind == "sphere":
            return 4 * math.pi * self.size[0] ** 2
        if self.kind == "box":
            a, b, c = self.size
            return 8 * (a * b + b * c + a * c)
        radius, half_h = self.size
        return 2 * math.pi * radius * 2 * half_h + 2 * math.pi * radius**2

    def sample_surface(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``n`` points uniformly distributed (by area) on the primitive's surface, world frame (n, 3)."""
        u = torch.rand(n, 3, generator=g, dtype=torch.float64)
        if self.kind == "sphere":
            p = torch.randn(n, 3, generator=g, dtype=torch.float64)
            p = p / p.norm(dim=-1, keepdim=True) * self.size[0]
        elif self.kind == "box":
            h = torch.tensor(self.size, dtype=torch.float64)
            face_area = torch.stack([h[1] * h[2], h[0] * h[2], h[0] * h[1]]).repeat(2)  # +x, +y, +z, -x, -y, -z
            face = torch.multinomial(face_area, n, replacement=True, generator=g)
            p = (u * 2 - 1) * h
            axis, sign = face % 3, torch.where(face < 3, 1.0, -1.0).double()
            p[torch.arange(n), axis] = sign * h[axis]
        else:
            radius, half_h = self.size
            side, cap = 2 * math.pi * radius * 2 * half_h, math.pi * radius**2
            part = torch.multinomial(torch.tensor([side, cap, cap], dtype=torch.float64), n, replacement=True, generator=g)
            ang = u[:, 0] * 2 * math.pi
            r = torch.where(part == 0, torch.full_like(ang, radius), radius * u[:, 1].sqrt())
            z = torch.where(part == 0, (u[:, 2] * 2 - 1) * half_h, torch.where(part == 1, half_h, -half_h))
            p = torch.stack([r * ang.cos(), r * ang.sin(), z], -1)
        return p @ self.R.T + torch.tensor(self.center, dtype=torch.float64)

    def albedo(self, p_local: torch.Tensor) -> torch.Tensor:
        f = self.frequency
        if self.pattern == "checker":  # latitude / longitude checker
            lon = torch.atan2(p_local[:, 1], p_local[:, 0])
            lat = torch.acos((p_local[:, 2] / p_local.norm(dim=-1)).clamp(-1, 1))
            parity = (torch.floor(lon * f / math.pi) + torch.floor(lat * f / math.pi)) % 2
        elif self.pattern == "cube_checker":
            parity = torch.floor(p_local * f).sum(-1) % 2
        else:  # stripes along the local z axis, thin dark bands
            parity = (torch.sin(p_local[:, 2] * f * 2 * math.pi) > 0.6).double()
        a, b = torch.tensor(self.color_a, dtype=p_local.dtype), torch.tensor(self.color_b, dtype=p_local.dtype)
        return a + (b - a) * parity[:, None]


def _hit_sphere(o, d, size):
    r = size[0]
    a, b, c = (d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - r * r
    disc = b * b - 4 * a * c
    sq = disc.clamp(min=0).sqrt()
    t0, t1 = (-b - sq) / (2 * a), (-b + sq) / (2 * a)
    t = torch.where(t0 > 1e-9, t0, t1)
    t = torch.where((disc >= 0) & (t > 1e-9), t, torch.full_like(t, math.inf))
    p = o + d * t.nan_to_num(posinf=0)[:, None]
    return t, p / r


def _hit_box(o, d, size):
    h = torch.tensor(size, dtype=o.dtype)
    dd = torch.where(d == 0, torch.full_like(d, 1e-300), d)
    ta, tb = (h - o) / dd, (-h - o) / dd
    t_near, axis = torch.minimum(ta, tb).max(-1)
    t_far = torch.maximum(ta, tb).amin(-1)
    t = torch.where((t_far >= t_near) & (t_near > 1e-9), t_near, torch.full_like(t_near, math.inf))
    normal = torch.zeros_like(o)
    normal.scatter_(1, axis[:, None], -torch.sign(dd.gather(1, axis[:, None])))
    return t, normal


def _hit_cylinder(o, d, size):
    radius, half_h = size
    inf = torch.full_like(o[:, 0], math.inf)
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = 2 * (o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1])
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - radius**2
    disc = b * b - 4 * a * c
    t_side = (-b - disc.clamp(min=0).sqrt()) / (2 * a).clamp(min=1e-300)
    z_side = o[:, 2] + d[:, 2] * t_side
    t_side = torch.where((disc >= 0) & (a > 1e-12) & (t_side > 1e-9) & (z_side.abs() <= half_h), t_side, inf)
    dz = torch.where(d[:, 2] == 0, torch.full_like(d[:, 2], 1e-300), d[:, 2])
    t_cap = torch.minimum((half_h - o[:, 2]) / dz, (-half_h - o[:, 2]) / dz)
    xy = o[:, :2] + d[:, :2] * t_cap[:, None]
    t_cap = torch.where((t_cap > 1e-9) & ((xy**2).sum(-1) <= radius**2), t_cap, inf)
    t = torch.minimum(t_side, t_cap)
    p = o + d * t.nan_to_num(posinf=0)[:, None]
    side_n = torch.cat([p[:, :2] / radius, torch.zeros_like(p[:, 2:])], -1)
    cap_n = torch.zeros_like(p)
    cap_n[:, 2] = torch.sign(p[:, 2])
    return t, torch.where((t_side <= t_cap)[:, None], side_n, cap_n)


@dataclass
class Scene:
    primitives: list[Primitive]

    def intersect(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> dict[str, torch.Tensor]:
        """First surface along each ray: ``t`` (inf if none), ``prim`` (-1 if none), world ``normal``, ``point``."""
        rays_o, rays_d = rays_o.double(), rays_d.double()
        best_t = torch.full(rays_o.shape[:1], math.inf, dtype=torch.float64)
        prim = torch.full(rays_o.shape[:1], -1, dtype=torch.long)
        normal = torch.zeros_like(rays_o)
        for k, p in enumerate(self.primitives):
            t, n_local = p.intersect(rays_o, rays_d)
            closer = t < best_t
            best_t = torch.where(closer, t, best_t)
            prim[closer] = k
            normal[closer] = (n_local @ p.R.T)[closer]
        point = rays_o + rays_d * best_t.nan_to_num(posinf=0)[:, None]
        return {"t": best_t, "prim": prim, "normal": normal, "point": point}

    def shade(self, hit: dict[str, torch.Tensor]) -> torch.Tensor:
        """Lambertian colour (N, 3) of the hit points (zeros where nothing was hit)."""
        rgb = torch.zeros(hit["t"].shape[0], 3, dtype=torch.float64)
        light = LIGHT_DIR / LIGHT_DIR.norm()
        for k, p in enumerate(self.primitives):
            sel = hit["prim"] == k
            if sel.any():
                lambert = (hit["normal"][sel] @ light).clamp(min=0)
                rgb[sel] = p.albedo(p.to_local(hit["point"][sel])) * (AMBIENT + (1 - AMBIENT) * lambert[:, None])
        return rgb.clamp(0, 1)

    def sdf(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([p.sdf(x.double()) for p in self.primitives], -1).amin(-1)

    def sample_surface(self, n: int, seed: int = 0) -> torch.Tensor:
        """About ``n`` points uniformly distributed over the scene's outer surface (n, 3): each primitive's
        surface sampled by area, keeping the points not inside another primitive (the exact boundary of the
        union, which is what the images show)."""
        g = torch.Generator().manual_seed(seed)
        areas = torch.tensor([p.area() for p in self.primitives], dtype=torch.float64)
        counts = torch.round(areas / areas.sum() * n).long()
        pts = []
        for k, (prim, m) in enumerate(zip(self.primitives, counts.tolist())):
            x = prim.sample_surface(m, g)
            others = [q.sdf(x) for j, q in enumerate(self.primitives) if j != k]
            keep = torch.stack(others, -1).amin(-1) > 0 if others else torch.ones(m, dtype=torch.bool)
            pts.append(x[keep])
        return torch.cat(pts)


def default_scene() -> Scene:
    """Five primitives within the unit-ish ball: a checkered sphere, a rotated cube, a striped
    cylinder, a thin pole and a small bright sphere (the fine detail)."""
    return Scene([
        Primitive("sphere", (-0.45, -0.35, 0.05), (0.5,), (0.9, 0.2, 0.15), (0.95, 0.85, 0.3), "checker", 6),
        Primitive("box", (0.5, 0.3, -0.1), (0.32, 0.3, 0.4), (0.15, 0.45, 0.85), (0.9, 0.9, 0.95), "cube_checker", 3.0,
                  rotation_deg=(10, 20, 35)),
        Primitive("cylinder", (0.1, -0.55, -0.35), (0.28, 0.25), (0.2, 0.75, 0.3), (0.05, 0.25, 0.1), "stripes", 4.0,
                  rotation_deg=(0, 0, 0)),
        Primitive("cylinder", (-0.2, 0.55, 0.1), (0.05, 0.6), (0.95, 0.6, 0.1), (0.4, 0.1, 0.6), "stripes", 3.0,
                  rotation_deg=(20, -15, 0)),
        Primitive("sphere", (0.35, -0.2, 0.55), (0.18,), (0.95, 0.95, 0.95), (0.6, 0.15, 0.55), "checker", 4),
    ])
