"""Pinhole projection, one convention for the suite: pixel coordinates are continuous with pixel centres at
index + 0.5 (as :func:`src.render.rays.get_rays` casts rays through them), ``K`` a 3 x 3 matrix (skew kept)."""
from __future__ import annotations

import torch


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> torch.Tensor:
    """K (3, 3) float64 from focal lengths and principal point in pixels."""
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)


def project_points(points: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor | None = None,
                   min_depth: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Points (..., 3) to pixel coordinates (..., 2) (u right, v down; centres at index + 0.5) and depth (...)
    (positive in front of the camera). ``c2w``: an OpenGL camera-to-world (4, 4) or (3, 4) for world points (the
    ray methods' cameras); None for points already in an OpenCV camera frame (x right, y down, z forward: depth
    maps). ``min_depth``: divide by at least this depth (points behind the camera then land far off the image)."""
    if c2w is not None:
        K = K.to(c2w)
        R, t = c2w[:3, :3], c2w[:3, 3]
        cam = (points - t) @ R  # R^T (p - t): OpenGL camera frame (y up, looking down -z)
        depth, x, y = -cam[..., 2], cam[..., 0], -cam[..., 1]
    else:
        K = K.to(points)
        depth, x, y = points[..., 2], points[..., 0], points[..., 1]
    z = depth if min_depth is None else depth.clamp_min(min_depth)
    x, y = x / z, y / z
    u = K[0, 0] * x + K[0, 1] * y + K[0, 2]
    v = K[1, 1] * y + K[1, 2]
    return torch.stack([u, v], -1), depth
