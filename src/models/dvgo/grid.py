"""Voxel grids over an axis-aligned box: a trilinear dense grid and a nearest-voxel boolean mask."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def grid_points(xyz_min: torch.Tensor, xyz_max: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Coordinates (X, Y, Z, 3) of the grid's vertices (vertex k of n at min + k (max - min) / (n - 1))."""
    axes = [torch.linspace(float(lo), float(hi), int(n), device=xyz_min.device)
            for lo, hi, n in zip(xyz_min, xyz_max, size)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)


class DenseGrid(nn.Module):
    """``channels`` values at each vertex of an X x Y x Z lattice, read by trilinear interpolation
    (``align_corners=True``: vertex (0,0,0) sits at ``xyz_min``); zero outside the box."""

    def __init__(self, channels: int, world_size: tuple[int, int, int], xyz_min: torch.Tensor,
                 xyz_max: torch.Tensor) -> None:
        super().__init__()
        self.grid = nn.Parameter(torch.zeros(1, channels, *world_size))
        self.register_buffer("xyz_min", xyz_min.clone().float())
        self.register_buffer("xyz_max", xyz_max.clone().float())

    @property
    def world_size(self) -> tuple[int, int, int]:
        return tuple(self.grid.shape[2:])

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        """xyz (N, 3) -> values (N, C)."""
        ind = ((xyz - self.xyz_min) / (self.xyz_max - self.xyz_min)).flip(-1) * 2 - 1  # grid_sample wants (z, y, x)
        out = F.grid_sample(self.grid, ind.reshape(1, 1, 1, -1, 3), mode="bilinear", align_corners=True)
        return out.reshape(self.grid.shape[1], -1).T

    @torch.no_grad()
    def resample(self, world_size: tuple[int, int, int]) -> None:
        """Trilinearly resample the values onto a finer or coarser lattice over the same box."""
        data = F.interpolate(self.grid.data, size=tuple(int(s) for s in world_size), mode="trilinear",
                             align_corners=True)
        self.grid = nn.Parameter(data)


class MaskGrid(nn.Module):
    """Boolean occupancy on a lattice; a point reads its nearest vertex, and is False outside the box."""

    def __init__(self, mask: torch.Tensor, xyz_min: torch.Tensor, xyz_max: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())
        self.register_buffer("xyz_min", xyz_min.clone().float())
        self.register_buffer("xyz_max", xyz_max.clone().float())

    @torch.no_grad()
    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        rel = (xyz - self.xyz_min) / (self.xyz_max - self.xyz_min)  # (N, 3), the box as [0, 1]^3
        inside = torch.ones(xyz.shape[0], dtype=torch.bool, device=xyz.device)
        flat = torch.zeros(xyz.shape[0], dtype=torch.long, device=xyz.device)
        for axis, n in enumerate(self.mask.shape):  # per axis with Python sizes: no tensor made per call
            i = torch.round(rel[:, axis] * (n - 1)).long()
            inside &= (i >= 0) & (i < n)
            flat = flat * n + i.clamp(0, n - 1)
        return self.mask.reshape(-1)[flat] & inside
