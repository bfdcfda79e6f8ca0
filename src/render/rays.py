"""Pinhole cameras in the OpenGL convention used by Blender/NeRF data.

Camera axes: x right, y up, the camera looks down -z. Pixel (u, v): u right, v down; pixel (i, j)
covers [i, i+1) x [j, j+1) and its ray passes through the centre (i + 0.5, j + 0.5), as DVGO does.
``c2w`` is (3, 4) or (4, 4) camera-to-world.
"""
from __future__ import annotations

import math

import torch


def intrinsics_from_fov(width: int, height: int, camera_angle_x: float) -> torch.Tensor:
    """K (3, 3) with ``focal = 0.5 W / tan(0.5 camera_angle_x)`` and the principal point at the centre."""
    return intrinsics_from_focal(width, height, 0.5 * width / math.tan(0.5 * camera_angle_x))


def intrinsics_from_focal(width: int, height: int, focal: float) -> torch.Tensor:
    """K (3, 3) with focal length ``focal`` (pixels) and the principal point at the image centre."""
    return torch.tensor([[focal, 0.0, 0.5 * width], [0.0, focal, 0.5 * height], [0.0, 0.0, 1.0]], dtype=torch.float32)


def get_rays(height: int, width: int, K: torch.Tensor, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through every pixel centre: origins and (unnormalised, camera z = -1) directions, (H, W, 3) each.

    ``d_cam = ((u - cx - s y) / fx, -y, -1)`` with ``y = (v - cy) / fy`` and skew ``s = K[0, 1]`` (0 for
    most cameras; calibrated DTU cameras have one), ``d = R d_cam``, ``o = t``; ray depth ``t`` along such a
    ``d`` equals the camera-space depth.
    """
    v, u = torch.meshgrid(
        torch.arange(height, dtype=c2w.dtype, device=c2w.device) + 0.5,
        torch.arange(width, dtype=c2w.dtype, device=c2w.device) + 0.5,
        indexing="ij",
    )  # (H, W) each
    return rays_through(K, c2w, u, v)


def rays_through(K: torch.Tensor, c2w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through image points (u, v) (any shape; pixel centres are at index + 0.5), as :func:`get_rays`."""
    K = K.to(c2w)
    y = (v - K[1, 2]) / K[1, 1]
    dirs = torch.stack([(u - K[0, 2] - K[0, 1] * y) / K[0, 0], -y, -torch.ones_like(u)], -1)  # (..., 3)
    rays_d = dirs @ c2w[:3, :3].T
    rays_o = c2w[:3, 3].expand_as(rays_d)
    return rays_o, rays_d


def viewdirs_of(rays_d: torch.Tensor) -> torch.Tensor:
    """Unit view directions."""
    return rays_d / rays_d.norm(dim=-1, keepdim=True)
