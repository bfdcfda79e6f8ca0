"""Pure-torch reference ops over flattened samples (the specification every fast backend must equal).

Samples of a batch of rays are stored flat: ``ray_id`` (M,) int64 sorted ascending gives the ray of
each sample, so one ray's samples are contiguous and ordered front to back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def raw2alpha(density: torch.Tensor, shift: float | torch.Tensor, interval: float) -> torch.Tensor:
    """Raw density to alpha, DVGO's activation: ``alpha = 1 - (1 + exp(density + shift))^(-interval)``.

    Written as ``-expm1(-softplus(density + shift) * interval)`` for precision at small alpha.
    """
    return -torch.expm1(-F.softplus(density + shift) * interval)


def ray_layout(ray_id: torch.Tensor, n_rays: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample position within its ray (M,), samples per ray (n_rays,), first sample of each ray (n_rays,)."""
    counts = torch.bincount(ray_id, minlength=n_rays)  # (n_rays,)
    starts = torch.cumsum(counts, 0) - counts  # (n_rays,)
    pos = torch.arange(ray_id.numel(), device=ray_id.device) - starts[ray_id]  # (M,)
    return pos, counts, starts


def alpha_to_weights(
    alpha: torch.Tensor, ray_id: torch.Tensor, n_rays: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Volume-rendering weights from per-sample alpha.

    ``T_i = prod_{j<i} (1 - alpha_j)`` (exclusive, within the ray), ``w_i = T_i * alpha_i``,
    ``T_last = prod_j (1 - alpha_j)`` (the light that passes the whole ray; 1 for empty rays).

    Args: alpha (M,), ray_id (M,) sorted, n_rays. Returns weights (M,), T (M,), T_last (n_rays,).
    """
    pos, counts, _ = ray_layout(ray_id, n_rays)
    width = int(counts.max()) if counts.numel() and alpha.numel() else 0
    trans = torch.ones(n_rays, width + 1, dtype=alpha.dtype, device=alpha.device)  # (n_rays, max_n + 1)
    trans = trans.index_put((ray_id, pos + 1), 1 - alpha)
    trans = torch.cumprod(trans, dim=1)  # inclusive products, shifted by one column = exclusive
    T = trans[ray_id, pos]  # (M,)
    T_last = trans.gather(1, counts[:, None]).squeeze(1)  # (n_rays,)
    return T * alpha, T, T_last


def segment_sum(values: torch.Tensor, ray_id: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Sum of per-sample ``values`` (M, ...) over each ray: out[r] = sum_{i: ray_id[i]=r} values[i]."""
    out = values.new_zeros((n_rays, *values.shape[1:]))
    return out.index_add(0, ray_id, values)


def ray_aabb(
    rays_o: torch.Tensor, rays_d: torch.Tensor, xyz_min: torch.Tensor, xyz_max: torch.Tensor,
    near: float, far: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit of rays through an axis-aligned box, in units of ``rays_d``, clamped to [near, far].

    Slab test: ``t_min = max_axis min(ta, tb)``, ``t_max = min_axis max(ta, tb)``. Returns t_min, t_max
    (n_rays,) and ``hit`` (n_rays,) bool, false where the ray misses the box within [near, far].
    """
    d = torch.where(rays_d == 0, torch.full_like(rays_d, 1e-6), rays_d)
    ta = (xyz_max - rays_o) / d
    tb = (xyz_min - rays_o) / d
    t_min = torch.minimum(ta, tb).amax(-1).clamp(min=near, max=far)
    t_max = torch.maximum(ta, tb).amin(-1).clamp(min=near, max=far)
    return t_min, t_max, t_max > t_min


def sample_pts_on_rays(
    rays_o: torch.Tensor, rays_d: torch.Tensor, xyz_min: torch.Tensor, xyz_max: torch.Tensor,
    near: float, far: float, stepdist: float,
) -> dict[str, torch.Tensor]:
    """Points every ``stepdist`` (world units) from where each ray enters the box, kept while inside it.

    ``t_k = t_min + k * stepdist / |d|`` for k < ceil((t_max - t_min) |d| / stepdist).
    Returns flattened ``pts`` (M, 3), ``ray_id`` (M,), ``step_id`` (M,), ``t`` (M,) and per-ray
    ``n_steps`` (n_rays,) (samples before the box test, as DVGO's ``N_steps``).
    """
    t_min, t_max, hit = ray_aabb(rays_o, rays_d, xyz_min, xyz_max, near, far)
    inv_norm = rays_d.norm(dim=-1).reciprocal()  # (n_rays,)
    n_steps = torch.where(hit, torch.ceil((t_max - t_min) / (stepdist * inv_norm)), torch.zeros_like(t_min)).long()
    ray_id = torch.repeat_interleave(torch.arange(rays_o.shape[0], device=rays_o.device), n_steps)  # (M,)
    starts = torch.cumsum(n_steps, 0) - n_steps
    step_id = torch.arange(ray_id.numel(), device=rays_o.device) - starts[ray_id]  # (M,)
    t = t_min[ray_id] + step_id * (stepdist * inv_norm[ray_id])  # (M,)
    pts = rays_o[ray_id] + rays_d[ray_id] * t[:, None]  # (M, 3)
    inside = ((pts >= xyz_min) & (pts <= xyz_max)).all(-1)
    return {
        "pts": pts[inside], "ray_id": ray_id[inside], "step_id": step_id[inside], "t": t[inside],
        "n_steps": n_steps,
    }
