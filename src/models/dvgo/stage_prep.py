"""DVGO's one-off steps that prepare each stage (between iterations): boxes, view counts, near-camera masking, mask
caches, the rays through the fine stage's mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src import kernels
from src import stop
from src.data.blender import Views
from src.data.rays import RayBank
from src.models.dvgo.field import DirectVoxGO
from src.models.dvgo.grid import DenseGrid, MaskGrid, grid_points
from src.render.rays import get_rays


@torch.no_grad()
def bbox_from_frusta(bank: RayBank, near: float, far: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The box enclosing every training ray between ``near`` and ``far`` along its unit view direction."""
    lo = torch.full((3,), float("inf"), device=bank.rays_o.device)
    hi = -lo
    for o, d in zip(bank.rays_o.split(1 << 20), bank.rays_d.split(1 << 20)):
        stop.check("DVGO's scene box from the camera frusta")
        v = F.normalize(d, dim=-1)
        pts = torch.cat([o + v * near, o + v * far])
        lo, hi = torch.minimum(lo, pts.amin(0)), torch.maximum(hi, pts.amax(0))
    return lo, hi


@torch.no_grad()
def maskout_near_cam_vox(field: DirectVoxGO, cam_centers: torch.Tensor, near: float) -> None:
    """Density -100 at vertices closer than ``near`` to any training camera (they cannot be seen)."""
    pts = grid_points(field.xyz_min, field.xyz_max, field.density.world_size)  # (X, Y, Z, 3)
    nearest = torch.stack([torch.cdist(pts.reshape(-1, 3), c).amin(-1) for c in cam_centers.split(100)]).amin(0)
    field.density.grid[0, 0][nearest.reshape(pts.shape[:3]) <= near] = -100


def voxel_count_views(field: DirectVoxGO, views: Views, downrate: int, near: float, stepsize: float) -> torch.Tensor:
    """For each vertex, how many training views have rays passing near it (a trilinear weight > 1
    summed over the view's rays, as DVGO counts); (1, 1, X, Y, Z). Drives the per-voxel learning rate."""
    device = field.xyz_min.device
    count = torch.zeros_like(field.density.grid)
    h, w = views.hw
    for i, c2w in enumerate(views.c2w):
        where = f"DVGO's per-voxel view count (view {i + 1} of {len(views.c2w)})"
        rays_o, rays_d = get_rays(h, w, views.intrinsics(i), c2w.to(device))
        rays_o, rays_d = rays_o[::downrate, ::downrate].reshape(-1, 3), rays_d[::downrate, ::downrate].reshape(-1, 3)
        ones = DenseGrid(1, field.density.world_size, field.xyz_min, field.xyz_max).to(device)
        ones.grid.data.fill_(1)
        for o, d in zip(rays_o.split(16384), rays_d.split(16384)):
            stop.check(where)  # a full-resolution view takes seconds on a CPU
            s = kernels.sample_pts_on_rays(o, d, field.xyz_min, field.xyz_max, near, 1e9, stepsize * field.voxel_size)
            ones(s["pts"]).sum().backward()
        count += ones.grid.grad > 1
    return count


@torch.no_grad()
def bbox_from_coarse(coarse: DirectVoxGO, thres: float, world_bound_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of coarse vertices with alpha > ``thres``, enlarged by ``world_bound_scale``."""
    pts = grid_points(coarse.xyz_min, coarse.xyz_max, coarse.density.world_size)
    active = pts[coarse.dense_alpha() > thres]
    if active.numel() == 0:
        raise RuntimeError("DVGO coarse stage found no occupied voxel (alpha > bbox_thres): the scene is empty "
                           "to the coarse model; check the data, near/far, and the coarse schedule")
    lo, hi = active.amin(0), active.amax(0)
    shift = (hi - lo) * (world_bound_scale - 1) / 2
    return lo - shift, hi + shift


@torch.no_grad()
def mask_from_coarse(coarse: DirectVoxGO, fine: DirectVoxGO, thres: float) -> torch.Tensor:
    """Fine-lattice occupancy: the coarse max-pooled alpha >= ``thres``, read at each fine vertex."""
    coarse_mask = MaskGrid(coarse.dense_alpha(pool=True) >= thres, coarse.xyz_min, coarse.xyz_max)
    pts = grid_points(fine.xyz_min, fine.xyz_max, fine.density.world_size)
    return coarse_mask(pts.reshape(-1, 3)).reshape(pts.shape[:3])


@torch.no_grad()
def rays_through_mask(mask: MaskGrid, field: DirectVoxGO, bank: RayBank, near: float, stepsize: float) -> torch.Tensor:
    """Indices of the bank's rays that pass at least one occupied vertex of ``mask`` (DVGO's in_maskcache rays)."""
    hits = []
    for o, d in zip(bank.rays_o.split(65536), bank.rays_d.split(65536)):
        stop.check("DVGO's selection of the rays through the coarse geometry")
        s = kernels.sample_pts_on_rays(o, d, field.xyz_min, field.xyz_max, near, 1e9, stepsize * field.voxel_size)
        hit = torch.zeros(o.shape[0], dtype=torch.bool, device=o.device)
        hit[s["ray_id"][mask(s["pts"])]] = True
        hits.append(hit)
    return torch.cat(hits).nonzero()[:, 0]
