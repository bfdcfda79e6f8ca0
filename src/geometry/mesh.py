"""Meshes from scalar fields: the field is evaluated on a regular grid in blocks (bounded memory at any
resolution), triangulated by marching cubes (PyMCubes, the library NeuS uses) and mapped back to world
coordinates. PLY in and out (binary little-endian, float32 vertices, int32 faces), and surface sampling."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from src import stop


@torch.no_grad()
def evaluate_grid(field: Callable[[torch.Tensor], torch.Tensor], bound_min: Sequence[float],
                  bound_max: Sequence[float], resolution: int, block: int = 64,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """``field`` (M, 3) -> (M,) on the ``resolution``^3 vertices of the box [bound_min, bound_max] (both
    ends included), ``block``^3 points per call; returns (R, R, R) float32 indexed [x, y, z]."""
    axes = [torch.linspace(float(lo), float(hi), resolution, device=device) for lo, hi in zip(bound_min, bound_max)]
    out = np.zeros((resolution,) * 3, dtype=np.float32)
    for i, xs in enumerate(axes[0].split(block)):
        for j, ys in enumerate(axes[1].split(block)):
            stop.check(f"evaluating the field on a {resolution}^3 grid (mesh extraction)")
            for k, zs in enumerate(axes[2].split(block)):
                pts = torch.stack(torch.meshgrid(xs, ys, zs, indexing="ij"), -1)
                vals = field(pts.reshape(-1, 3)).reshape(pts.shape[:3])
                out[i * block:i * block + len(xs), j * block:j * block + len(ys), k * block:k * block + len(zs)] = \
                    vals.float().cpu().numpy()
    return out


def extract_mesh(field: Callable[[torch.Tensor], torch.Tensor], bound_min: Sequence[float], bound_max: Sequence[float],
                 resolution: int,
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


def mesh_area(verts: np.ndarray, faces: np.ndarray) -> float:
    """Total area of the triangles."""
    v = verts[faces]
    return float(0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=-1).sum())


def icosphere(subdivisions: int = 2, prefer_pytorch3d: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The unit ico-sphere: the icosahedron with each triangle split in four ``subdivisions`` times, new
    vertices pushed to the sphere (10 * 4^level + 2 vertices: 2562 at level 4), (V, 3) float64 and (F, 3) int64.
    ``prefer_pytorch3d``: pytorch3d's ``ico_sphere`` when it is importable (the same subdivision; its vertex order
    may differ), as Proto-Depth's prototypes use; ours otherwise and by default (generated data stays the same)."""
    if prefer_pytorch3d:
        try:
            from pytorch3d.utils import ico_sphere
        except ImportError:
            pass
        else:
            mesh = ico_sphere(subdivisions)
            return (mesh.verts_packed().double().cpu().numpy(), mesh.faces_packed().long().cpu().numpy())
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
