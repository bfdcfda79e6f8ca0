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
    """Per-sample position within its ray (M,), samples per ray (n_rays,), first sample of each ray (n_rays,).

    By binary search in the sorted ``ray_id``: no output size depends on the data, so on a GPU nothing
    waits for the device (``bincount`` would).
    """
    ids = torch.arange(n_rays, device=ray_id.device, dtype=ray_id.dtype)
    starts = torch.searchsorted(ray_id, ids)  # (n_rays,)
    counts = torch.searchsorted(ray_id, ids, right=True) - starts  # (n_rays,)
    pos = torch.arange(ray_id.numel(), device=ray_id.device) - starts.index_select(0, ray_id)  # (M,)
    return pos, counts, starts


def alpha_to_weights(
    alpha: torch.Tensor, ray_id: torch.Tensor, n_rays: int, stop_T: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Volume-rendering weights from per-sample alpha.

    ``T_i = prod_{j<i} (1 - alpha_j)`` (exclusive, within the ray), ``w_i = T_i * alpha_i``,
    ``T_last = prod_j (1 - alpha_j)`` (the light that passes the whole ray; 1 for empty rays).
    Early ray termination (DVGO's CUDA renderer): samples reached with ``T_i < stop_T`` are not composited
    (their alpha counts as 0: weight 0, no gradient, ``T`` stays at its last value); ``stop_T = 0`` keeps all.

    Args: alpha (M,), ray_id (M,) sorted, n_rays, stop_T. Returns weights (M,), T (M,), T_last (n_rays,).
    """
    pos, counts, _ = ray_layout(ray_id, n_rays)
    width = int(counts.max()) if counts.numel() and alpha.numel() else 0
    trans = torch.ones(n_rays, width + 1, dtype=alpha.dtype, device=alpha.device)  # (n_rays, max_n + 1)
    trans = torch.cumprod(trans.index_put((ray_id, pos + 1), 1 - alpha), dim=1)  # column k + 1: after sample k
    T = trans[ray_id, pos]  # (M,)
    if stop_T <= 0:
        return T * alpha, T, trans.gather(1, counts[:, None]).squeeze(1)
    # the alive samples are a prefix of each ray, and their T involves only earlier alive samples; past it
    # T stays at the light left after the last alive sample (column n_alive), which is also T_last
    alive = T.detach() >= stop_T
    n_alive = torch.zeros_like(counts).index_add_(0, ray_id, alive.long())  # (n_rays,)
    T_last = trans.gather(1, n_alive[:, None]).squeeze(1)  # (n_rays,)
    return torch.where(alive, T * alpha, torch.zeros_like(T)), torch.where(alive, T, T_last[ray_id]), T_last


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


def ray_steps(rays_d: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor, hit: torch.Tensor, stepdist: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ray: the step ``dt = stepdist / |d|`` in units of ``d``, and the step count
    ``ceil((t_max - t_min) / dt)`` (0 for rays that miss); every backend counts samples with this."""
    dt = stepdist * rays_d.norm(dim=-1).reciprocal()
    return dt, torch.where(hit, torch.ceil((t_max - t_min) / dt), torch.zeros_like(t_min)).long()


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
    dt, n_steps = ray_steps(rays_d, t_min, t_max, hit, stepdist)  # (n_rays,) each
    ray_id = torch.repeat_interleave(torch.arange(rays_o.shape[0], device=rays_o.device), n_steps)  # (M,)
    starts = torch.cumsum(n_steps, 0) - n_steps
    step_id = torch.arange(ray_id.numel(), device=rays_o.device) - starts[ray_id]  # (M,)
    t = t_min[ray_id] + step_id * dt[ray_id]  # (M,)
    pts = rays_o[ray_id] + rays_d[ray_id] * t[:, None]  # (M, 3)
    inside = ((pts >= xyz_min) & (pts <= xyz_max)).all(-1)
    return {
        "pts": pts[inside], "ray_id": ray_id[inside], "step_id": step_id[inside], "t": t[inside],
        "n_steps": n_steps,
    }


def total_variation_add_grad(
    param: torch.Tensor, grad: torch.Tensor, wx: float, wy: float, wz: float, dense_mode: bool
) -> torch.Tensor:
    """DVGO's total-variation regulariser, added straight into a grid's gradient (in place).

    For a grid (..., X, Y, Z), every voxel gets ``sum over its axis neighbours n of w_axis / 6 * clamp(p - p_n, -1, 1)``
    (the gradient of a smooth-L1 TV), ``wx, wy, wz`` weighting neighbours along X, Y, Z; the division by 6 is
    DVGO's (its CUDA op divides the weights so), so weights from DVGO's configs mean the same here. Unless
    ``dense_mode``, only voxels whose gradient is already non-zero (touched by rays this step) are changed.
    Returns ``grad``.
    """
    wx, wy, wz = wx / 6, wy / 6, wz / 6
    p = param.detach()
    add = torch.zeros_like(p)
    for dim, weight in ((-3, wx), (-2, wy), (-1, wz)):
        n = p.shape[dim]
        if n < 2 or weight == 0:
            continue
        diff = (p.narrow(dim, 1, n - 1) - p.narrow(dim, 0, n - 1)).clamp(-1, 1)  # p_{k+1} - p_k
        add.narrow(dim, 1, n - 1).add_(weight * diff)  # voxel k+1, neighbour k
        add.narrow(dim, 0, n - 1).sub_(weight * diff)  # voxel k, neighbour k+1
    if not dense_mode:
        add = torch.where(grad != 0, add, torch.zeros_like(add))
    return grad.add_(add)


def distortion_loss(
    weights: torch.Tensor, s: torch.Tensor, interval: float | torch.Tensor, ray_id: torch.Tensor, n_rays: int
) -> torch.Tensor:
    """mip-NeRF 360's distortion loss over flattened samples, in O(N), averaged over rays.

    ``L_r = sum_ij w_i w_j |s_i - s_j| + 1/3 sum_i interval_i w_i^2`` (``original_distloss`` of
    ``torch_efficient_distloss``), with the pairwise term computed as ``2 sum_i w_i (s_i A_i - B_i)``,
    ``A_i = sum_{j<i} w_j``, ``B_i = sum_{j<i} w_j s_j``
    within the ray: ``s`` must increase along each ray (samples front to back). ``interval``: a scalar or a
    tensor (one value, or one per sample). Returns ``mean_r L_r`` over all ``n_rays`` (rays without samples
    count as 0). Forward and backward are written out (:class:`_DistortionLoss`).
    """
    return _DistortionLoss.apply(weights, s, interval, ray_id, n_rays)


def _padded(x: torch.Tensor, lin: torch.Tensor | None, n_rays: int, width: int) -> torch.Tensor:
    """Flat samples (M,) into the (n_rays, width) layout, zero-padded; a view when every ray is full."""
    if lin is None:
        return x.reshape(n_rays, width)
    return x.new_zeros(n_rays * width).index_copy_(0, lin, x).reshape(n_rays, width)


def _flat(x: torch.Tensor, lin: torch.Tensor | None) -> torch.Tensor:
    return x.reshape(-1) if lin is None else x.reshape(-1).index_select(0, lin)


def _layout_of_rays(ray_id: torch.Tensor, n_rays: int) -> tuple[int, torch.Tensor | None]:
    """The longest ray's sample count, and each sample's index in the (n_rays, width) layout - None when
    every ray has ``width`` samples (then the flat samples already are that layout)."""
    M = ray_id.numel()
    k = M // n_rays if n_rays else 0
    if k and M == n_rays * k:  # sorted ids: ray j owns [j k, (j + 1) k) iff both ends of each block read j
        ids = torch.arange(n_rays, device=ray_id.device, dtype=ray_id.dtype)
        if torch.equal(ray_id[::k], ids) and torch.equal(ray_id[k - 1::k], ids):
            return k, None
    pos, counts, _ = ray_layout(ray_id, n_rays)
    width = max(int(counts.max()), 1) if M else 1
    return width, ray_id * width + pos


class _DistortionLoss(torch.autograd.Function):
    """The O(N) distortion loss on the rays' (n_rays, longest ray) layout, zero-padded (padding adds nothing),
    with forward and backward written out: prefix sums within each ray (``cumsum`` along the row), and
    ``d/dw_k = 2 (s_k (2 A_k - W) + WM - 2 B_k) + 2/3 iv_k w_k``, ``d/ds_k = 2 w_k (2 A_k + w_k - W)``."""

    @staticmethod
    def forward(ctx, w, s, interval, ray_id, n_rays):
        width, lin = _layout_of_rays(ray_id, n_rays)
        w2, s2 = _padded(w, lin, n_rays, width), _padded(s, lin, n_rays, width)  # (n_rays, width)
        ws2 = w2 * s2
        A = torch.cumsum(w2, 1).sub_(w2)  # exclusive prefix sums within each ray
        B = torch.cumsum(ws2, 1).sub_(ws2)
        pair = torch.addcmul(-B, s2, A).mul_(w2).sum()  # sum_k w_k (s_k A_k - B_k)
        if torch.is_tensor(interval) and interval.numel() > 1:  # one interval per sample
            uni = (interval * w * w).sum() / 3
        else:
            uni = torch.dot(w, w) * (interval.reshape(()) if torch.is_tensor(interval) else interval) / 3
        ctx.save_for_backward(w, w2, s2, A, B, lin, interval if torch.is_tensor(interval) else None)
        ctx.interval, ctx.n_rays = (None if torch.is_tensor(interval) else interval), n_rays
        return (2 * pair + uni) / max(n_rays, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        w, w2, s2, A, B, lin, iv_tensor = ctx.saved_tensors
        interval = ctx.interval if iv_tensor is None else iv_tensor
        scale = g / max(ctx.n_rays, 1)
        W = A[:, -1:] + w2[:, -1:]  # (n_rays, 1) ray totals (padding is zero)
        WM = B[:, -1:] + w2[:, -1:] * s2[:, -1:]
        v = (2 * A).sub_(W)  # 2 A - W
        gw = gs = giv = None
        if ctx.needs_input_grad[0]:
            gw2 = torch.addcmul(WM, s2, v).sub_(B, alpha=2).mul_(2 * scale)  # 2 (s v + WM - 2 B)
            gw = _flat(gw2, lin).add_((2 / 3) * interval * w * scale)
        if ctx.needs_input_grad[1]:
            gs = _flat(v.add_(w2).mul_(w2).mul_(2 * scale), lin)
        if iv_tensor is not None and ctx.needs_input_grad[2]:
            giv = (scale * w * w / 3).sum_to_size(iv_tensor.shape)
        return gw, gs, giv, None, None


def distortion_loss_quadratic(w: torch.Tensor, m: torch.Tensor, interval: float | torch.Tensor) -> torch.Tensor:
    """The O(N^2) definition on padded (B, N) tensors (Mip-NeRF 360's distortion loss; ``original_distloss`` of
    ``torch_efficient_distloss``): the specification."""
    loss_uni = (1 / 3) * (interval * w.pow(2)).sum(-1).mean()
    ww = w.unsqueeze(-1) * w.unsqueeze(-2)
    mm = (m.unsqueeze(-1) - m.unsqueeze(-2)).abs()
    return loss_uni + (ww * mm).sum((-1, -2)).mean()


@torch.no_grad()
def grid_adam_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, beta1: float,
    beta2: float, eps: float, step_size: float, skip_zero_grad: bool, per_lr: torch.Tensor | None,
) -> None:
    """One in-place Adam update of ``param`` and its moments (DVGO's masked Adam, see ``GridAdam``).

    ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``; ``p -= step_size * per_lr * m / (sqrt(v) + eps)``;
    with ``skip_zero_grad``, entries whose gradient is exactly zero keep ``p``, ``m`` and ``v``.
    """
    new_avg = exp_avg * beta1 + grad * (1 - beta1)
    new_avg_sq = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    update = step_size * new_avg / (new_avg_sq.sqrt() + eps)
    if per_lr is not None:
        update = update * per_lr.to(update)
    if skip_zero_grad:
        touched = grad != 0
        new_avg = torch.where(touched, new_avg, exp_avg)
        new_avg_sq = torch.where(touched, new_avg_sq, exp_avg_sq)
        update = torch.where(touched, update, torch.zeros_like(update))
    exp_avg.copy_(new_avg)
    exp_avg_sq.copy_(new_avg_sq)
    param.sub_(update)
