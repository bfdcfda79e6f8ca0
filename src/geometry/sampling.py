"""Points on meshes: area-uniform samples (differentiable in the vertices), farthest-point sampling, and the even
samples made from the two (the PU benchmark's ground truth, the training patches of meshes)."""
from __future__ import annotations

import numpy as np
import torch


def sample_points(verts: torch.Tensor, faces: torch.Tensor, n: int, generator: torch.Generator | None = None,
                  return_faces: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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


def sample_surface(verts: np.ndarray, faces: np.ndarray, n: int, seed: int = 0,
                   return_normals: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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


def farthest_point_sample(points: torch.Tensor, k: int, start: int = 0) -> torch.Tensor:
    """Indices (k,) of a farthest-point sample of (N, 3), or (B, k) of each cloud of (B, N, 3): each next point
    is the farthest from those taken, from point ``start``. Chosen without gradients, on the points' device. The
    coordinates are laid out (B, 3, N), so each step's squared distances are three contiguous passes over N
    rather than a reduction over a last dimension of 3 (2.2x faster on a CPU for 8 x 4096 points)."""
    batched = points.dim() == 3
    pts = points.detach() if batched else points.detach()[None]
    b, n, _ = pts.shape
    if k > n:
        raise ValueError(f"farthest_point_sample: asked for {k} of {n} points")
    coords = pts.transpose(1, 2).contiguous()  # (B, 3, N)
    idx = torch.empty(b, k, dtype=torch.long, device=pts.device)
    dist = torch.full((b, n), float("inf"), dtype=pts.dtype, device=pts.device)
    step = torch.empty_like(dist)
    cur = torch.full((b, 1), start, dtype=torch.long, device=pts.device)
    for i in range(k):
        idx[:, i] = cur[:, 0]
        centre = coords.gather(2, cur[:, None].expand(-1, 3, -1))  # (B, 3, 1)
        torch.sum((coords - centre).square_(), 1, out=step)
        torch.minimum(dist, step, out=dist)
        cur = dist.argmax(-1, keepdim=True)
    return idx if batched else idx[0]


def even_surface_sample(verts: np.ndarray, faces: np.ndarray, n: int, oversample: int = 8, seed: int = 0,
                        start: int | None = 0, dtype: torch.dtype = torch.float64,
                        return_normals: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``n`` points spread evenly over a mesh: ``oversample * n`` area-uniform samples (:func:`sample_surface`,
    seeded), in ``dtype``, thinned by farthest-point sampling from sample ``start`` (None: a sample drawn with the
    same seed), close to a Poisson-disk sample: the PU benchmark's ground truth (``oversample`` 8, ``start`` 0)
    and the meshes' training patches. -> (n, 3), with ``return_normals`` also each point's triangle's unit normal."""
    dense = sample_surface(verts, faces, oversample * n, seed=seed, return_normals=return_normals)
    dense, normals = dense if return_normals else (dense, None)
    dense = dense.to(dtype)
    if start is None:
        start = int(torch.randint(oversample * n, (1,), generator=torch.Generator().manual_seed(seed)))
    keep = farthest_point_sample(dense, n, start=start)
    return (dense[keep], normals.to(dtype)[keep]) if return_normals else dense[keep]
