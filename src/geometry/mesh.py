"""Meshes from scalar fields: the field is evaluated on a regular grid in blocks (bounded memory at any
resolution), triangulated by marching cubes (PyMCubes, the library NeuS uses) and mapped back to world
coordinates. PLY in and out (binary little-endian, float32 vertices, int32 faces), and surface sampling."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch


@torch.no_grad()
def evaluate_grid(field: Callable[[torch.Tensor], torch.Tensor], bound_min, bound_max, resolution: int,
                  block: int = 64, device: torch.device | str = "cpu") -> np.ndarray:
    """``field`` (M, 3) -> (M,) on the ``resolution``^3 vertices of the box [bound_min, bound_max] (both
    ends included), ``block``^3 points per call; returns (R, R, R) float32 indexed [x, y, z]."""
    axes = [torch.linspace(float(lo), float(hi), resolution, device=device) for lo, hi in zip(bound_min, bound_max)]
    out = np.zeros((resolution,) * 3, dtype=np.float32)
    for i, xs in enumerate(axes[0].split(block)):
        for j, ys in enumerate(axes[1].split(block)):
            for k, zs in enumerate(axes[2].split(block)):
                pts = torch.stack(torch.meshgrid(xs, ys, zs, indexing="ij"), -1)
                vals = field(pts.reshape(-1, 3)).reshape(pts.shape[:3])
                out[i * block:i * block + len(xs), j * block:j * block + len(ys), k * block:k * block + len(zs)] = \
                    vals.float().cpu().numpy()
    return out


def extract_mesh(field: Callable[[torch.Tensor], torch.Tensor], bound_min, bound_max, resolution: int,
                 level: float = 0.0, block: int = 64, device: torch.device | str = "cpu",
                 inside: str = "below") -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` set of ``field`` in the box: vertices (V, 3) float64 in the field's coordinates and
    triangles (F, 3) int64, oriented with normals pointing out of the region where the field is ``inside``
    the level (``below`` for an SDF, ``above`` for a density). Empty arrays if the level is not crossed."""
    import mcubes

    values = evaluate_grid(field, bound_min, bound_max, resolution, block, device).astype(np.float64)
    if not (values.min() < level < values.max()):
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    # PyMCubes orients faces out of the region above the level: negate an SDF (as NeuS does)
    u = -values if inside == "below" else values
    verts, faces = mcubes.marching_cubes(u, -level if inside == "below" else level)
    lo, hi = np.asarray(bound_min, dtype=np.float64), np.asarray(bound_max, dtype=np.float64)
    verts = verts / (resolution - 1) * (hi - lo) + lo
    return verts, faces.astype(np.int64)


def write_ply(path: str | Path, verts: np.ndarray, faces: np.ndarray) -> Path:
    """Binary little-endian PLY with float32 x, y, z and int32 triangle indices."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(verts)}\nproperty float x\n"
              f"property float y\nproperty float z\nelement face {len(faces)}\n"
              "property list uchar int vertex_indices\nend_header\n")
    face_rec = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    face_rec["n"], face_rec["idx"] = 3, faces
    with path.open("wb") as f:
        f.write(header.encode("ascii"))
        f.write(np.asarray(verts, dtype="<f4").tobytes())
        f.write(face_rec.tobytes())
    return path


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read what :func:`write_ply` writes (binary little-endian, float x y z, uchar/int triangle lists)."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    header = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError(f"{path}: only binary little-endian PLY is supported")
    counts = {line.split()[1]: int(line.split()[2]) for line in header if line.startswith("element")}
    body = data[end + len(b"end_header\n"):]
    n_v, n_f = counts.get("vertex", 0), counts.get("face", 0)
    verts = np.frombuffer(body, dtype="<f4", count=n_v * 3).reshape(n_v, 3).astype(np.float64)
    rec = np.frombuffer(body, dtype=[("n", "u1"), ("idx", "<i4", (3,))], count=n_f, offset=n_v * 12)
    return verts, rec["idx"].astype(np.int64)


def mesh_area(verts: np.ndarray, faces: np.ndarray) -> float:
    v = verts[faces]
    return float(0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=-1).sum())


def sample_points(verts: torch.Tensor, faces: torch.Tensor, n: int, generator: torch.Generator | None = None,
                  return_faces: bool = False):
    """n points on each mesh (..., V, 3) sharing ``faces`` (F, 3): triangles drawn by area, uniform
    barycentric coordinates; differentiable with respect to the vertices. -> (..., n, 3), and with
    ``return_faces`` the index (..., n) of the triangle each point lies on."""
    lead = verts.shape[:-2]
    tri = verts.reshape(-1, verts.shape[-2], 3)[:, faces]  # (M, F, 3, 3)
    area = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]).norm(dim=-1)
    face = torch.multinomial(area.detach() + 1e-12, n, replacement=True, generator=generator)  # (M, n)
    r1 = torch.rand(face.shape + (1,), generator=generator, dtype=verts.dtype, device=verts.device).sqrt()
    r2 = torch.rand(face.shape + (1,), generator=generator, dtype=verts.dtype, device=verts.device)
    chosen = torch.gather(tri, 1, face[..., None, None].expand(-1, -1, 3, 3))  # (M, n, 3, 3)
    pts = (1 - r1) * chosen[:, :, 0] + r1 * (1 - r2) * chosen[:, :, 1] + r1 * r2 * chosen[:, :, 2]
    return (pts.reshape(lead + (n, 3)), face.reshape(lead + (n,))) if return_faces else pts.reshape(lead + (n, 3))


def sample_surface(verts: np.ndarray, faces: np.ndarray, n: int, seed: int = 0, return_normals: bool = False):
    """``n`` points uniformly distributed over one mesh (:func:`sample_points` in float64 with a seeded
    generator), (n, 3) float64; with ``return_normals`` also the unit normal (n, 3) of the triangle each lies on
    (by the faces' winding; zero on a degenerate triangle). The points are the same either way."""
    v, f = torch.as_tensor(verts, dtype=torch.float64), torch.as_tensor(faces)
    pts, face = sample_points(v, f, n, torch.Generator().manual_seed(seed), return_faces=True)
    if not return_normals:
        return pts
    tri = v[f[face]]  # (n, 3, 3)
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    return pts, normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-30)


def icosphere(subdivisions: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The unit ico-sphere: the icosahedron with each triangle split in four ``subdivisions`` times, new
    vertices pushed to the sphere (10 * 4^level + 2 vertices: 2562 at level 4), (V, 3) float64 and (F, 3)."""
    t = (1 + 5**0.5) / 2
    v = [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
         [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]]
    f = [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6],
         [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10],
         [8, 6, 7], [9, 8, 1]]
    verts = [np.asarray(p, dtype=np.float64) / np.linalg.norm(p) for p in v]
    faces = f
    for _ in range(subdivisions):
        cache: dict[tuple[int, int], int] = {}

        def mid(a: int, b: int) -> int:
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
        faces = new
    return np.stack(verts), np.asarray(faces, dtype=np.int64)
