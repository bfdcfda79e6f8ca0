"""DVGO's radiance field: a density grid, a colour/feature grid (k0) and, in the fine stage, a small
view-dependent MLP; rendered by sampling every ``stepsize`` voxels along rays through the box."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from src import kernels
from src.models.dvgo.grid import DenseGrid, MaskGrid, grid_points
from src.render import composite
from src.render.encoding import positional_encoding
from src.phases import phase


class DirectVoxGO(nn.Module):
    """One stage's field. ``rgbnet_dim=0``: k0 holds rgb logits (coarse stage); otherwise k0 holds
    ``rgbnet_dim`` features decoded with the encoded view direction by a ReLU MLP (fine stage).

    ``stop_T``: early ray termination as DVGO's CUDA renderer (samples reached with transmittance below it
    are not composited, and skip the colour grid and MLP); 0 composites every sample.

    The box, resolution and density shift live in buffers (checkpoints); the renderer reads Python copies
    of the scalars derived from them (``act_shift_value``, ``voxel_size``, ``voxel_size_ratio``), refreshed
    whenever those buffers change (:meth:`refresh_scalars`), so a training step never reads the GPU.
    """

    def __init__(self, num_voxels: int, num_voxels_base: int, alpha_init: float, fast_color_thres: float,
                 rgbnet_dim: int, rgbnet_depth: int, rgbnet_width: int, viewbase_pe: int, stop_T: float = 0.0) -> None:
        super().__init__()
        self.num_voxels_base, self.fast_color_thres, self.viewbase_pe = num_voxels_base, fast_color_thres, viewbase_pe
        self.stop_T = stop_T
        self.register_buffer("xyz_min", -torch.ones(3))
        self.register_buffer("xyz_max", torch.ones(3))
        self.register_buffer("act_shift", torch.tensor(math.log(1 / (1 - alpha_init) - 1)))
        self.register_buffer("num_voxels", torch.tensor(float(num_voxels)))
        size = self.world_size_for(num_voxels)
        self.density = DenseGrid(1, size, self.xyz_min, self.xyz_max)
        self.k0 = DenseGrid(rgbnet_dim if rgbnet_dim > 0 else 3, size, self.xyz_min, self.xyz_max)
        self.mask_cache = MaskGrid(torch.ones(size, dtype=torch.bool), self.xyz_min, self.xyz_max)
        self.rgbnet = None
        if rgbnet_dim > 0:
            layers = [nn.Linear(rgbnet_dim + 3 + 6 * viewbase_pe, rgbnet_width), nn.ReLU(inplace=True)]
            for _ in range(rgbnet_depth - 2):
                layers += [nn.Linear(rgbnet_width, rgbnet_width), nn.ReLU(inplace=True)]
            layers.append(nn.Linear(rgbnet_width, 3))
            self.rgbnet = nn.Sequential(*layers)
            nn.init.constant_(self.rgbnet[-1].bias, 0)
        self.refresh_scalars()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_scalars())

    # ---- geometry of the lattice -------------------------------------------------------------
    def voxel_size_for(self, num_voxels: float) -> float:
        return float(((self.xyz_max - self.xyz_min).prod() / num_voxels) ** (1 / 3))

    def world_size_for(self, num_voxels: float) -> tuple[int, int, int]:
        return tuple(int(s) for s in ((self.xyz_max - self.xyz_min) / self.voxel_size_for(num_voxels)).long())

    @torch.no_grad()
    def refresh_scalars(self) -> None:
        """Python copies of the buffers' scalars (reads the device once: at setup, rescaling and loading)."""
        self.act_shift_value = float(self.act_shift)
        self.voxel_size = self.voxel_size_for(float(self.num_voxels))
        # voxel size relative to the base resolution: the alpha interval scales with it
        self.voxel_size_ratio = self.voxel_size / self.voxel_size_for(self.num_voxels_base)

    @torch.no_grad()
    def shift_density(self, delta: float) -> None:
        """Add ``delta`` to the density activation's shift (DVGO lowers it at each progressive-scaling step)."""
        self.act_shift += delta
        self.refresh_scalars()

    @torch.no_grad()
    def reset_box(self, xyz_min: torch.Tensor, xyz_max: torch.Tensor, num_voxels: float) -> None:
        """Place the field on a new box at a resolution of ``num_voxels``; values restart at zero."""
        self.xyz_min.copy_(xyz_min)
        self.xyz_max.copy_(xyz_max)
        self.num_voxels.fill_(num_voxels)
        size = self.world_size_for(num_voxels)
        for g in (self.density, self.k0):
            g.grid = nn.Parameter(torch.zeros(1, g.grid.shape[1], *size, device=g.grid.device))
            g.xyz_min.copy_(xyz_min)
            g.xyz_max.copy_(xyz_max)
        self.mask_cache = MaskGrid(torch.ones(size, dtype=torch.bool, device=xyz_min.device), xyz_min, xyz_max)
        self.refresh_scalars()

    @torch.no_grad()
    def scale_volume_grid(self, num_voxels: float) -> None:
        """Progressive scaling: resample both grids at ``num_voxels`` and rebuild the mask cache there."""
        self.num_voxels.fill_(num_voxels)
        self.refresh_scalars()
        size = self.world_size_for(num_voxels)
        self.density.resample(size)
        self.k0.resample(size)
        pts = grid_points(self.xyz_min, self.xyz_max, size)
        alpha = self.dense_alpha(pool=True)
        self.mask_cache = MaskGrid(self.mask_cache(pts.reshape(-1, 3)).reshape(size) & (alpha > self.fast_color_thres),
                                   self.xyz_min, self.xyz_max)

    @torch.no_grad()
    def dense_alpha(self, pool: bool = False, interval: float | None = None) -> torch.Tensor:
        """Alpha (X, Y, Z) at the density grid's own vertices (3x3x3 max-pooled if ``pool``)."""
        density = self.density.grid
        if pool:
            density = F.max_pool3d(density, kernel_size=3, padding=1, stride=1)
        interval = self.voxel_size_ratio if interval is None else interval
        return kernels.raw2alpha(density[0, 0], self.act_shift_value, interval)

    @torch.no_grad()
    def update_occupancy_cache(self) -> None:
        """Drop from the mask cache what has become empty space (max-pooled alpha <= fast_color_thres)."""
        pts = grid_points(self.xyz_min, self.xyz_max, tuple(self.mask_cache.mask.shape))
        density = self.density(pts.reshape(-1, 3)).reshape(1, 1, *self.mask_cache.mask.shape)
        alpha = kernels.raw2alpha(F.max_pool3d(density, kernel_size=3, padding=1, stride=1)[0, 0], self.act_shift_value,
                                  self.voxel_size_ratio)
        self.mask_cache.mask &= alpha > self.fast_color_thres

    # ---- rendering -------------------------------------------------------------------------------
    def sample(self, rays_o: torch.Tensor, rays_d: torch.Tensor, near: float, stepsize: float) -> dict[str, torch.Tensor]:
        """Points every ``stepsize`` voxels inside the box (DVGO ignores ``far`` here: rays end at the box),
        then only those in the mask cache."""
        s = kernels.sample_pts_on_rays(rays_o, rays_d, self.xyz_min, self.xyz_max, near, 1e9, stepsize * self.voxel_size)
        keep = self.mask_cache(s["pts"])
        return {k: (v[keep] if k != "n_steps" else v) for k, v in s.items()}

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor, near: float, stepsize: float,
                background: float, viewdirs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Render rays (N, 3): rgb (N, 3), depth (N,), acc (N,), per-sample values for the losses, and
        ``n_colour``: how many samples reached the colour grid (after culling and early termination).
        ``viewdirs``: unit world view directions when ``rays_d`` are not world directions (NDC), else None."""
        n_rays = rays_o.shape[0]
        with phase("sample"):
            s = self.sample(rays_o, rays_d, near, stepsize)
        pts, ray_id, t, step_id = s["pts"], s["ray_id"], s["t"], s["step_id"]
        with phase("density"):
            alpha = kernels.raw2alpha(self.density(pts)[:, 0], self.act_shift_value, stepsize * self.voxel_size_ratio)
            if self.fast_color_thres > 0:  # skip near-transparent samples before the colour query
                keep = alpha > self.fast_color_thres
                pts, ray_id, t, step_id, alpha = pts[keep], ray_id[keep], t[keep], step_id[keep], alpha[keep]
        with phase("composite"):
            weights, T, T_last = kernels.alpha_to_weights(alpha, ray_id, n_rays, self.stop_T)
            if self.fast_color_thres > 0 or self.stop_T > 0:  # samples whose weight is negligible, or past termination
                keep = (weights > self.fast_color_thres) & (T >= self.stop_T)
                pts, ray_id, t, step_id, weights = pts[keep], ray_id[keep], t[keep], step_id[keep], weights[keep]
        with phase("colour"):
            k0 = self.k0(pts)
            if self.rgbnet is None:
                rgb = torch.sigmoid(k0)
            else:
                viewdirs = F.normalize(rays_d, dim=-1) if viewdirs is None else viewdirs
                view_emb = positional_encoding(viewdirs, self.viewbase_pe)[ray_id]  # (M, 3 + 6 pe)
                rgb = torch.sigmoid(self.rgbnet(torch.cat([k0, view_emb], -1)))
        with phase("composite"):
            out_rgb = composite(weights, rgb, ray_id, n_rays, T_last, background)
            depth = composite(weights, t[:, None], ray_id, n_rays)[:, 0]
        return {
            "rgb": out_rgb, "depth": depth,
            "acc": 1 - T_last,
            "T_last": T_last, "weights": weights, "raw_rgb": rgb, "ray_id": ray_id, "step_id": step_id,
            "n_steps": s["n_steps"], "n_colour": pts.shape[0],
        }

    @torch.no_grad()
    def match_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Reshape grids and the mask cache to those of a saved state (grids change size while training)."""
        for name, grid in (("density", self.density), ("k0", self.k0)):
            shape = state[f"{prefix}{name}.grid"].shape
            if grid.grid.shape != shape:
                grid.grid = nn.Parameter(torch.zeros(shape, device=grid.grid.device))
        mask = state[f"{prefix}mask_cache.mask"]
        if self.mask_cache.mask.shape != mask.shape:
            self.mask_cache.mask = torch.zeros_like(mask, device=self.mask_cache.mask.device)
