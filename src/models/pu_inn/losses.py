"""Point-distribution losses of the upsampling literature, written for batched torch on (B, N, 3) patches in
the unit sphere (the training patches' frame).

- :func:`uniform_loss`: PU-GAN's uniform term (Li et al., ICCV 2019, Sec. 3.3, in the form its released code
  trains with): ``0.05 N`` farthest-point seeds; for each p in 0.4%, 0.6%, ..., 1.2% a ball of radius
  ``sqrt(p)`` around each seed holding ``n_p = p N`` points (a ball query: the points inside, the first one
  repeated when fewer); in each ball, each point's nearest-neighbour distance in the ball, their mean ``d``
  against the spacing expected of ``n_p`` evenly spread points on the disk, ``d_hat = sqrt(pi r^2 / n_p)``:
  ``(d - d_hat)^2 / d_hat``, averaged over balls and weighted by ``(100 p)^2``; the mean over the five p.
  The paper's imbalance factor (point count against ``n_p``) is not a separate factor in that code; it acts
  through the ball query's padding (a ball with too few points repeats one, whose distance 0 drags ``d``
  down). PU-GAN weighs it 10 against its reconstruction term's 100 (``uniform_w``, ``fidelity_w``).
- :func:`repulsion_loss`: PU-Net's repulsion (Yu et al., CVPR 2018, Sec. 3.3): for each point its 4 nearest
  others within 0.07, ``-mean(d * exp(-d^2 / h^2))`` with h = 0.03, which pushes points that are closer
  than about h apart.
- :func:`surface_loss`: how far points lie off the target's surface: the squared distance from each point to the
  tangent plane at its nearest target point (point-to-plane, as ICP's), along the mesh's normal where the data
  carries one, else the normal of a plane fitted to that target point's nearest neighbours. Chamfer's
  point-to-point half pulls a point towards one sample of the surface, along it as much as onto it; the plane
  distance is zero anywhere on the surface, so it asks only for the step onto it (the point-to-surface
  distance Grad-PU, He et al., CVPR 2023, learns to descend).
"""
from __future__ import annotations

import math

import torch

from src.geometry.knn import knn_points
from src.geometry.sampling import farthest_point_sample

UNIFORM_PERCENTAGES = (0.004, 0.006, 0.008, 0.010, 0.012)


def uniform_loss(points: torch.Tensor, percentages: tuple[float, ...] = UNIFORM_PERCENTAGES,
                 radius: float = 1.0, seed_fraction: float = 0.05) -> torch.Tensor:
    """PU-GAN's uniform loss (module docstring) of clouds (B, N, 3): a scalar."""
    b, n, _ = points.shape
    seeds = farthest_point_sample(points, max(1, int(n * seed_fraction)))  # (B, M), from each cloud's first point
    centres = points.gather(1, seeds[..., None].expand(-1, -1, 3))  # (B, M, 3); the positions keep gradients
    total = points.new_zeros(())
    for p in percentages:
        n_p = max(2, int(n * p))
        r2 = p * radius  # the ball's squared radius (r = sqrt(p radius))
        near_d2, near = knn_points(centres, points, n_p)  # (B, M, n_p) nearest first
        inside = near_d2 <= r2
        near = torch.where(inside, near, near[..., :1])  # ball query: the first point stands in for the rest
        group = points.gather(1, near.reshape(b, -1, 1).expand(-1, -1, 3)).reshape(-1, n_p, 3)  # (B M, n_p, 3)
        nn_d2 = knn_points(group, group, 2)[0][..., 1]  # each point's nearest other point in the ball
        nn = (nn_d2 + 1e-8).sqrt().reshape(b, -1, n_p).mean(-1)  # (B, M) mean nearest-neighbour distance
        expect = math.sqrt(math.pi * radius**2 * p / n_p)
        total = total + ((nn - expect).square() / (expect + 1e-8)).mean() * (100 * p) ** 2
    return total / len(percentages)


def repulsion_loss(points: torch.Tensor, k: int = 4, radius: float = 0.07, h: float = 0.03) -> torch.Tensor:
    """PU-Net's repulsion loss (module docstring) of clouds (B, N, 3): a scalar."""
    near_d2 = knn_points(points, points, k + 1)[0][..., 1:].clamp(min=1e-12)  # the k nearest others
    near_d2 = torch.where(near_d2 <= radius**2, near_d2, torch.full_like(near_d2, radius**2))  # ball query
    dist = near_d2.sqrt()
    return (radius - dist * torch.exp(-near_d2 / h**2)).mean()


def pca_normals(points: torch.Tensor, k: int = 8) -> torch.Tensor:
    """Unit normals (B, N, 3) of clouds (B, N, 3): the least-variance direction of each point's ``k`` nearest
    (itself included); the sign is arbitrary (a plane distance does not need it)."""
    b, n, _ = points.shape
    idx = knn_points(points, points, min(k, n))[1]
    nb = points.gather(1, idx.reshape(b, -1, 1).expand(-1, -1, 3)).reshape(b, n, -1, 3)
    nb = nb - nb.mean(2, keepdim=True)
    return torch.linalg.eigh(nb.transpose(2, 3) @ nb)[1][..., 0]  # eigenvalues ascending: the smallest's vector


def surface_loss(points: torch.Tensor, target: torch.Tensor, normals: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared point-to-plane distance (module docstring) of points (B, M, 3) to the surface sampled by
    target (B, N, 3) with unit normals (B, N, 3) (None: :func:`pca_normals` of the target): a scalar. The planes
    carry no gradient."""
    with torch.no_grad():
        nearest = knn_points(points, target, 1)[1][..., 0]  # (B, M)
        if normals is None:
            normals = pca_normals(target)
        at = nearest[..., None].expand(-1, -1, 3)
        base, normal = target.gather(1, at), normals.gather(1, at)
    return ((points - base) * normal).sum(-1).square().mean()
