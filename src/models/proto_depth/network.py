"""Proto-Depth's parts: a depth-map encoder, per-slot pose / prototype-weight heads, learnable prototypes
(vertex offsets on an ico-sphere), and the mesh transform of every batch x slot x prototype mesh (vectorised,
with the looped version as its reference). Surface sampling is ``src.geometry.mesh.sample_points``."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from src.geometry.mesh import icosphere
from src.geometry.rotation import euler_angles_to_matrix
from src.phases import phase


# ------------------------------------------------------------------------------------------ transform
def transform_meshes(verts: torch.Tensor, scale: torch.Tensor, euler: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Every prototype placed by every slot at once: ``R(euler) (scale * v) + t``.
    verts (P, V, 3); scale, euler, trans (B, K, 3) -> (B, K, P, V, 3). One batched Euler-to-matrix call, the
    scale folded into the matrix (``R diag(s)``), and one ``baddbmm`` over the B*K slots."""
    b, k, _ = scale.shape
    p, v, _ = verts.shape
    affine = euler_angles_to_matrix(euler.reshape(b * k, 3)) * scale.reshape(b * k, 1, 3)  # (B*K, 3, 3): R diag(s)
    placed = torch.baddbmm(trans.reshape(b * k, 1, 3), verts.reshape(1, p * v, 3).expand(b * k, -1, -1),
                           affine.transpose(1, 2))  # (B*K, P*V, 3)
    return placed.reshape(b, k, p, v, 3)


def transform_meshes_looped(verts: torch.Tensor, scale: torch.Tensor, euler: torch.Tensor,
                            trans: torch.Tensor) -> torch.Tensor:
    """The reference: the triple loop over batch, slots and prototypes (one rotation matrix per slot), as
    the method was first written. Same arguments and result as :func:`transform_meshes`."""
    b, k, _ = scale.shape
    out = []
    for bi in range(b):
        slots = []
        for ki in range(k):
            rot = euler_angles_to_matrix(euler[bi, ki])
            slots.append(torch.stack([(verts[pi] * scale[bi, ki]) @ rot.T + trans[bi, ki] for pi in range(verts.shape[0])]))
        out.append(torch.stack(slots))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ networks
class DepthEncoder(nn.Module):
    """A small CNN on (depth normalised per map, validity mask): strided 3x3 convolutions with GroupNorm,
    global average pooling -> (B, out_dim). No pretrained weights."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers, c = [], 2
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.ReLU(inplace=True)]
            c = w
        self.net = nn.Sequential(*layers)
        self.out_dim = c

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        valid = (depth > 0).float()
        n = valid.sum((1, 2, 3), keepdim=True).clamp_min(1)
        mean = (depth * valid).sum((1, 2, 3), keepdim=True) / n
        std = (((depth - mean) * valid) ** 2).sum((1, 2, 3), keepdim=True).div(n).sqrt().clamp_min(1e-3)
        x = torch.cat([(depth - mean) / std * valid, valid], 1)
        return self.net(x).mean((2, 3))


class Prototypes(nn.Module):
    """P learnable meshes: a shared unit ico-sphere plus per-prototype vertex offsets; the regularisers
    (edge length, normal consistency, uniform Laplacian) keep them well-formed."""

    def __init__(self, num_prototypes: int, ico_level: int, init_noise: float = 0.02, seed: int = 0) -> None:
        super().__init__()
        verts, faces = (torch.from_numpy(a) for a in icosphere(ico_level, prefer_pytorch3d=True))
        verts, faces = verts.float(), faces.long()
        self.register_buffer("base", verts)
        self.register_buffer("faces", faces)
        g = torch.Generator().manual_seed(seed)
        self.offsets = nn.Parameter(init_noise * torch.randn(num_prototypes, *verts.shape, generator=g))
        edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
        edges, inverse = edges.unique(dim=0, return_inverse=True)
        self.register_buffer("edges", edges)  # (E, 2)
        # the two faces beside each edge (closed manifold: exactly two), for normal consistency
        face_of = torch.arange(faces.shape[0]).repeat(3)
        order = inverse.argsort(stable=True)
        self.register_buffer("edge_faces", face_of[order].reshape(-1, 2))
        deg = torch.zeros(verts.shape[0]).index_add_(0, edges.flatten(), torch.ones(edges.numel()))
        self.register_buffer("degree", deg)

    def verts(self) -> torch.Tensor:
        return self.base + self.offsets  # (P, V, 3)

    def regularisers(self) -> dict[str, torch.Tensor]:
        v = self.verts()
        e = v[:, self.edges[:, 0]] - v[:, self.edges[:, 1]]  # (P, E, 3)
        tri = v[:, self.faces]
        normals = nn.functional.normalize(torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]), dim=-1)
        cos = (normals[:, self.edge_faces[:, 0]] * normals[:, self.edge_faces[:, 1]]).sum(-1)
        nb_sum = torch.zeros_like(v).index_add_(1, self.edges[:, 0], v[:, self.edges[:, 1]])
        nb_sum = nb_sum.index_add_(1, self.edges[:, 1], v[:, self.edges[:, 0]])
        lap = nb_sum / self.degree[None, :, None] - v
        return {"edge": (e**2).sum(-1).mean(), "normal": (1 - cos).mean(), "laplacian": lap.norm(dim=-1).mean()}


class SlotHeads(nn.Module):
    """From the encoding (B, C) to K slots: per-axis scale in [s_min, s_max], Euler angles in (-pi, pi),
    translation in (-t_max, t_max) (the normalised frame of the depth points), prototype weights (softmax
    over P). Each slot starts at its own random position so slots do not begin identical."""

    def __init__(self, in_dim: int, num_slots: int, num_prototypes: int, hidden: int = 256,
                 scale_range: tuple[float, float] = (0.05, 0.6), t_max: float = 1.2, seed: int = 0) -> None:
        super().__init__()
        self.k, self.p, self.scale_range, self.t_max = num_slots, num_prototypes, tuple(scale_range), t_max
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_slots * (9 + num_prototypes)))
        nn.init.normal_(self.mlp[-1].weight, std=1e-3)
        g = torch.Generator().manual_seed(seed)
        bias = torch.zeros(num_slots, 9 + num_prototypes)
        bias[:, 6:9] = torch.atanh((torch.rand(num_slots, 3, generator=g) - 0.5) / t_max)  # t in (-0.5, 0.5)
        bias[:, 9:] = 0.1 * torch.randn(num_slots, num_prototypes, generator=g)
        with torch.no_grad():
            self.mlp[-1].bias.copy_(bias.flatten())

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.mlp(feat).reshape(-1, self.k, 9 + self.p)
        lo, hi = self.scale_range
        return {"scale": lo + (hi - lo) * torch.sigmoid(out[..., 0:3]), "euler": math.pi * torch.tanh(out[..., 3:6]),
                "trans": self.t_max * torch.tanh(out[..., 6:9]), "weights": torch.softmax(out[..., 9:], -1)}


class ProtoDepthNet(nn.Module):
    """Depth (B, 1, H, W) -> K slot meshes (B, K, V, 3) in the normalised frame of the depth points: each slot's
    mesh is the prototype-weighted blend of its transformed prototypes (all share the ico-sphere's faces)."""

    def __init__(self, num_slots: int = 32, num_prototypes: int = 32, ico_level: int = 4,
                 encoder_widths: tuple[int, ...] = (32, 64, 128, 256), hidden: int = 256,
                 scale_range: tuple[float, float] = (0.05, 0.6), t_max: float = 1.2, seed: int = 0) -> None:
        super().__init__()
        self.encoder = DepthEncoder(tuple(encoder_widths))
        self.heads = SlotHeads(self.encoder.out_dim, num_slots, num_prototypes, hidden, scale_range, t_max, seed)
        self.prototypes = Prototypes(num_prototypes, ico_level, seed=seed)

    def forward(self, depth: torch.Tensor, looped: bool = False) -> dict[str, torch.Tensor]:
        with phase("encode"):
            slots = self.heads(self.encoder(depth))
        with phase("transform"):
            transform = transform_meshes_looped if looped else transform_meshes
            placed = transform(self.prototypes.verts(), slots["scale"], slots["euler"], slots["trans"])  # (B, K, P, V, 3)
            slots["verts"] = torch.einsum("bkp,bkpvc->bkvc", slots["weights"], placed)  # (B, K, V, 3)
        return slots


def slot_colours(k: int) -> np.ndarray:
    """k distinct RGB colours (uint8) for drawing slots."""
    hue = np.arange(k) / max(k, 1)
    rgb = np.stack([np.clip(np.abs(((hue * 6 + o) % 6) - 3) - 1, 0, 1) for o in (0, 4, 2)], -1)
    return (rgb * 255).astype(np.uint8)
