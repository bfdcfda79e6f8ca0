"""Triton implementations of the ops in :mod:`src.kernels.reference` (same signatures, same results).

Imported only when a ``triton`` backend is first used. Runs on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported (how the tests check it without a GPU).

Layout: samples of a batch of rays are flat, grouped by a sorted ``ray_id``. Per-ray kernels give each
ray one lane (``BLOCK_R`` rays per program) and walk its samples front to back (or back to front in a
backward pass), as DVGO's CUDA kernels give each ray one thread. Per-ray ``starts``/``counts`` come from
:func:`src.kernels.reference.ray_layout`. Scalar parameters travel as a small tensor of the data's dtype
(Triton would pass a Python float as float32), so float64 inputs are computed in float64 throughout.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from src.kernels.reference import ray_layout

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Block sizes change only how work is split over programs, never a result. The interpreter runs programs
# one after another, so it gets few large ones.
BLOCK = 65536 if _INTERPRET else 1024  # elements per program, elementwise kernels
BLOCK_R = 4096 if _INTERPRET else 64  # rays per program, per-ray kernels


def _grid(n: int, block: int) -> tuple[int]:
    return (max(triton.cdiv(n, block), 1),)


def _scalars(like: torch.Tensor, *values) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------------- precise helpers
# log1p and expm1 from log/exp with the exact-correction tricks (Goldberg; Kahan): accurate to a few ulps
# at every magnitude, in float32 and float64, where log(1 + z) and 1 - exp(-y) lose tiny values.
@triton.jit
def _log1p(z):
    u = 1.0 + z
    exact = u == 1.0
    return tl.where(exact, z, tl.log(u) * z / tl.where(exact, 1.0, u - 1.0))


@triton.jit
def _neg_expm1_neg(y):
    """1 - exp(-y) = -expm1(-y)."""
    x = -y
    u = tl.exp(x)
    special = (u == 1.0) | (u - 1.0 == -1.0)
    em1 = tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(tl.where(special, 0.5, u))))
    return -em1


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R: tl.constexpr):
    """This program's rays (one lane each): ray index, lane mask, first sample, sample count."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rays
    return r, rm, tl.load(starts_ptr + r, mask=rm, other=0), tl.load(counts_ptr + r, mask=rm, other=0)


def _layout(ray_id: torch.Tensor, n_rays: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-ray first sample and count (sorted ``ray_id``), and the longest ray's count."""
    _, counts, starts = ray_layout(ray_id, n_rays)
    return starts, counts, int(counts.max()) if counts.numel() else 0


@triton.jit
def _interval(iv_ptr, i, msk, IV_TENSOR: tl.constexpr):
    """The distortion loss's interval: per sample, or one scalar."""
    if IV_TENSOR:
        return tl.load(iv_ptr + i, mask=msk, other=0.0)
    return tl.load(iv_ptr)


# ------------------------------------------------------------------------------------------ raw2alpha
@triton.jit
def _raw2alpha_fwd(x_ptr, out_ptr, p_ptr, n, BLOCK: tl.constexpr):
    shift, interval = tl.load(p_ptr), tl.load(p_ptr + 1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0) + shift
    tl.store(out_ptr + offs, _neg_expm1_neg(_softplus(x) * interval), mask=mask)


@triton.jit
def _raw2alpha_bwd(x_ptr, gout_ptr, gin_ptr, p_ptr, n, BLOCK: tl.constexpr):
    shift, interval = tl.load(p_ptr), tl.load(p_ptr + 1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0) + shift
    g = tl.load(gout_ptr + offs, mask=mask, other=0.0)
    # d alpha / d x = interval * (1 - alpha) * sigmoid(x), with 1 - alpha = exp(-interval softplus(x))
    tl.store(gin_ptr + offs, g * interval * tl.exp(-interval * _softplus(x)) * tl.sigmoid(x), mask=mask)


class _Raw2Alpha(torch.autograd.Function):
    @staticmethod
    def forward(ctx, density, shift, interval):
        x = density.contiguous()
        out = torch.empty_like(x)
        params = _scalars(x, shift, interval)
        _raw2alpha_fwd[_grid(x.numel(), BLOCK)](x, out, params, x.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(x, params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, params = ctx.saved_tensors
        grad_in = torch.empty_like(x)
        _raw2alpha_bwd[_grid(x.numel(), BLOCK)](x, grad_out.contiguous(), grad_in, params, x.numel(), BLOCK=BLOCK)
        return grad_in, None, None


def raw2alpha(density, shift, interval):
    return _Raw2Alpha.apply(density, float(shift), float(interval))


# ----------------------------------------------------------------------------------- alpha_to_weights
@triton.jit
def _alpha2w_fwd(alpha_ptr, starts_ptr, counts_ptr, w_ptr, T_ptr, Tlast_ptr, n_rays, max_n,
                 BLOCK_R: tl.constexpr):
    r, rm, start, count = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    trans = tl.zeros([BLOCK_R], dtype=alpha_ptr.dtype.element_ty) + 1.0
    for k in range(0, max_n):
        m = rm & (k < count)
        a = tl.load(alpha_ptr + start + k, mask=m, other=0.0)
        tl.store(T_ptr + start + k, trans, mask=m)
        tl.store(w_ptr + start + k, trans * a, mask=m)
        trans = trans * (1.0 - a)
    tl.store(Tlast_ptr + r, trans, mask=rm)


@triton.jit
def _alpha2w_bwd(alpha_ptr, T_ptr, starts_ptr, counts_ptr, gw_ptr, gT_ptr, gTlast_ptr, galpha_ptr, n_rays, max_n,
                 BLOCK_R: tl.constexpr):
    # dL/da_k = T_k (gw_k - R_k), R_k = sum_{i>k} (gw_i a_i + gT_i) prod_{k<j<i} (1 - a_j) + gTlast prod_{j>k} (1 - a_j)
    # accumulated back to front: R_{k-1} = gw_k a_k + gT_k + (1 - a_k) R_k; no division by (1 - a).
    r, rm, start, count = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    R = tl.load(gTlast_ptr + r, mask=rm, other=0.0)
    for kk in range(0, max_n):
        k = count - 1 - kk
        m = rm & (k >= 0)
        a = tl.load(alpha_ptr + start + k, mask=m, other=0.0)
        t = tl.load(T_ptr + start + k, mask=m, other=0.0)
        gw = tl.load(gw_ptr + start + k, mask=m, other=0.0)
        gt = tl.load(gT_ptr + start + k, mask=m, other=0.0)
        tl.store(galpha_ptr + start + k, t * (gw - R), mask=m)
        R = tl.where(m, gw * a + gt + (1.0 - a) * R, R)


class _AlphaToWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alpha, ray_id, n_rays):
        alpha = alpha.contiguous()
        starts, counts, max_n = _layout(ray_id, n_rays)
        w, T = torch.empty_like(alpha), torch.empty_like(alpha)
        T_last = alpha.new_empty(n_rays)
        if n_rays:
            _alpha2w_fwd[_grid(n_rays, BLOCK_R)](alpha, starts, counts, w, T, T_last, n_rays, max_n, BLOCK_R=BLOCK_R)
        ctx.save_for_backward(alpha, T, starts, counts)
        ctx.max_n = max_n
        return w, T, T_last

    @staticmethod
    def backward(ctx, gw, gT, gTlast):
        alpha, T, starts, counts = ctx.saved_tensors
        n_rays = counts.numel()
        gw = torch.zeros_like(alpha) if gw is None else gw.contiguous()
        gT = torch.zeros_like(alpha) if gT is None else gT.contiguous()
        gTlast = alpha.new_zeros(n_rays) if gTlast is None else gTlast.contiguous()
        galpha = torch.empty_like(alpha)
        if n_rays:
            _alpha2w_bwd[_grid(n_rays, BLOCK_R)](alpha, T, starts, counts, gw, gT, gTlast, galpha, n_rays, ctx.max_n,
                                                 BLOCK_R=BLOCK_R)
        return galpha, None, None


def alpha_to_weights(alpha, ray_id, n_rays):
    return _AlphaToWeights.apply(alpha, ray_id, n_rays)


# ---------------------------------------------------------------------------------------- segment_sum
@triton.jit
def _segsum_fwd(v_ptr, starts_ptr, counts_ptr, out_ptr, n_rays, C, max_n,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rm = r < n_rays
    cm = c < C
    start = tl.load(starts_ptr + r, mask=rm, other=0)
    count = tl.load(counts_ptr + r, mask=rm, other=0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=v_ptr.dtype.element_ty)
    for k in range(0, max_n):
        m = (rm & (k < count))[:, None] & cm[None, :]
        acc += tl.load(v_ptr + (start + k)[:, None] * C + c[None, :], mask=m, other=0.0)
    tl.store(out_ptr + r[:, None] * C + c[None, :], acc, mask=rm[:, None] & cm[None, :])


class _SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, ray_id, n_rays):
        shape = values.shape
        v = values.reshape(shape[0], -1).contiguous()
        C = v.shape[1]
        starts, counts, max_n = _layout(ray_id, n_rays)
        out = v.new_zeros(n_rays, C)
        if n_rays and C:
            _segsum_fwd[_grid(n_rays, BLOCK_R)](v, starts, counts, out, n_rays, C, max_n, BLOCK_R=BLOCK_R,
                                                BLOCK_C=triton.next_power_of_2(C))
        ctx.save_for_backward(ray_id)
        return out.reshape(n_rays, *shape[1:])

    @staticmethod
    def backward(ctx, grad_out):
        (ray_id,) = ctx.saved_tensors
        return grad_out[ray_id], None, None  # a gather: one torch indexing op is already optimal


def segment_sum(values, ray_id, n_rays):
    return _SegmentSum.apply(values, ray_id, n_rays)


# --------------------------------------------------------------------------- ray-box and ray sampling
@triton.jit
def _slab(o, d, lo, hi):
    d = tl.where(d == 0.0, 1e-6, d)
    ta = (hi - o) / d
    tb = (lo - o) / d
    return tl.minimum(ta, tb), tl.maximum(ta, tb)


@triton.jit
def _ray_aabb_kernel(o_ptr, d_ptr, tmin_ptr, tmax_ptr, box_ptr, n, BLOCK: tl.constexpr):
    x0, y0, z0 = tl.load(box_ptr), tl.load(box_ptr + 1), tl.load(box_ptr + 2)
    x1, y1, z1 = tl.load(box_ptr + 3), tl.load(box_ptr + 4), tl.load(box_ptr + 5)
    near, far = tl.load(box_ptr + 6), tl.load(box_ptr + 7)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < n
    lo_x, hi_x = _slab(tl.load(o_ptr + 3 * r, mask=m, other=0.0), tl.load(d_ptr + 3 * r, mask=m, other=1.0), x0, x1)
    lo_y, hi_y = _slab(tl.load(o_ptr + 3 * r + 1, mask=m, other=0.0), tl.load(d_ptr + 3 * r + 1, mask=m, other=1.0),
                       y0, y1)
    lo_z, hi_z = _slab(tl.load(o_ptr + 3 * r + 2, mask=m, other=0.0), tl.load(d_ptr + 3 * r + 2, mask=m, other=1.0),
                       z0, z1)
    t_min = tl.minimum(tl.maximum(tl.maximum(tl.maximum(lo_x, lo_y), lo_z), near), far)
    t_max = tl.minimum(tl.maximum(tl.minimum(tl.minimum(hi_x, hi_y), hi_z), near), far)
    tl.store(tmin_ptr + r, t_min, mask=m)
    tl.store(tmax_ptr + r, t_max, mask=m)


def ray_aabb(rays_o, rays_d, xyz_min, xyz_max, near, far):
    o, d = rays_o.contiguous(), rays_d.contiguous()
    n = o.shape[0]
    t_min, t_max = o.new_empty(n), o.new_empty(n)
    if n:
        box = _scalars(o, *xyz_min.tolist(), *xyz_max.tolist(), near, far)
        _ray_aabb_kernel[_grid(n, BLOCK)](o, d, t_min, t_max, box, n, BLOCK=BLOCK)
    return t_min, t_max, t_max > t_min


@triton.jit
def _sample_kernel(o_ptr, d_ptr, tmin_ptr, dt_ptr, starts_ptr, nsteps_ptr, pts_ptr, rid_ptr, sid_ptr, t_ptr,
                   inside_ptr, box_ptr, n_rays, max_n, BLOCK_R: tl.constexpr):
    x0, y0, z0 = tl.load(box_ptr), tl.load(box_ptr + 1), tl.load(box_ptr + 2)
    x1, y1, z1 = tl.load(box_ptr + 3), tl.load(box_ptr + 4), tl.load(box_ptr + 5)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rays
    ox = tl.load(o_ptr + 3 * r, mask=rm, other=0.0)
    oy = tl.load(o_ptr + 3 * r + 1, mask=rm, other=0.0)
    oz = tl.load(o_ptr + 3 * r + 2, mask=rm, other=0.0)
    dx = tl.load(d_ptr + 3 * r, mask=rm, other=0.0)
    dy = tl.load(d_ptr + 3 * r + 1, mask=rm, other=0.0)
    dz = tl.load(d_ptr + 3 * r + 2, mask=rm, other=0.0)
    t0 = tl.load(tmin_ptr + r, mask=rm, other=0.0)
    dt = tl.load(dt_ptr + r, mask=rm, other=0.0)
    start = tl.load(starts_ptr + r, mask=rm, other=0)
    count = tl.load(nsteps_ptr + r, mask=rm, other=0)
    for k in range(0, max_n):
        m = rm & (k < count)
        i = start + k
        t = t0 + k * dt
        px, py, pz = ox + dx * t, oy + dy * t, oz + dz * t
        inside = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1) & (pz >= z0) & (pz <= z1)
        tl.store(pts_ptr + 3 * i, px, mask=m)
        tl.store(pts_ptr + 3 * i + 1, py, mask=m)
        tl.store(pts_ptr + 3 * i + 2, pz, mask=m)
        tl.store(rid_ptr + i, r.to(tl.int64), mask=m)
        tl.store(sid_ptr + i, tl.zeros_like(start) + k, mask=m)
        tl.store(t_ptr + i, t, mask=m)
        tl.store(inside_ptr + i, inside.to(tl.int8), mask=m)


def sample_pts_on_rays(rays_o, rays_d, xyz_min, xyz_max, near, far, stepdist):
    o, d = rays_o.contiguous(), rays_d.contiguous()
    t_min, t_max, hit = ray_aabb(o, d, xyz_min, xyz_max, near, far)
    # per-ray step count and spacing: the same torch expressions as the reference, so counts agree exactly
    inv_norm = d.norm(dim=-1).reciprocal()
    dt = stepdist * inv_norm
    n_steps = torch.where(hit, torch.ceil((t_max - t_min) / dt), torch.zeros_like(t_min)).long()
    starts = torch.cumsum(n_steps, 0) - n_steps
    M, n_rays = int(n_steps.sum()), o.shape[0]
    pts = o.new_empty(M, 3)
    ray_id = torch.empty(M, dtype=torch.long, device=o.device)
    step_id = torch.empty_like(ray_id)
    t = o.new_empty(M)
    inside = torch.empty(M, dtype=torch.int8, device=o.device)
    if M:
        box = _scalars(o, *xyz_min.tolist(), *xyz_max.tolist())
        _sample_kernel[_grid(n_rays, BLOCK_R)](o, d, t_min, dt, starts, n_steps, pts, ray_id, step_id, t, inside,
                                               box, n_rays, int(n_steps.max()), BLOCK_R=BLOCK_R)
    keep = inside.bool()
    return {"pts": pts[keep], "ray_id": ray_id[keep], "step_id": step_id[keep], "t": t[keep], "n_steps": n_steps}


# --------------------------------------------------------------------------------- total variation
@triton.jit
def _tv_kernel(p_ptr, g_ptr, w_ptr, X, Y, Z, n, DENSE: tl.constexpr, BLOCK: tl.constexpr):
    wx, wy, wz = tl.load(w_ptr), tl.load(w_ptr + 1), tl.load(w_ptr + 2)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    z = i % Z
    y = (i // Z) % Y
    x = (i // (Y * Z)) % X
    p = tl.load(p_ptr + i, mask=m, other=0.0)
    add = tl.zeros_like(p)
    add += tl.where(z > 0, wz * tl.clamp(p - tl.load(p_ptr + i - 1, mask=m & (z > 0), other=0.0), -1.0, 1.0), 0.0)
    add += tl.where(z < Z - 1, wz * tl.clamp(p - tl.load(p_ptr + i + 1, mask=m & (z < Z - 1), other=0.0), -1.0, 1.0), 0.0)
    add += tl.where(y > 0, wy * tl.clamp(p - tl.load(p_ptr + i - Z, mask=m & (y > 0), other=0.0), -1.0, 1.0), 0.0)
    add += tl.where(y < Y - 1, wy * tl.clamp(p - tl.load(p_ptr + i + Z, mask=m & (y < Y - 1), other=0.0), -1.0, 1.0), 0.0)
    add += tl.where(x > 0, wx * tl.clamp(p - tl.load(p_ptr + i - Y * Z, mask=m & (x > 0), other=0.0), -1.0, 1.0), 0.0)
    add += tl.where(x < X - 1,
                    wx * tl.clamp(p - tl.load(p_ptr + i + Y * Z, mask=m & (x < X - 1), other=0.0), -1.0, 1.0), 0.0)
    g = tl.load(g_ptr + i, mask=m, other=0.0)
    if DENSE:
        tl.store(g_ptr + i, g + add, mask=m)
    else:
        tl.store(g_ptr + i, g + add, mask=m & (g != 0.0))


def total_variation_add_grad(param, grad, wx, wy, wz, dense_mode):
    if not (param.is_contiguous() and grad.is_contiguous()):
        raise ValueError("total_variation_add_grad: param and grad must be contiguous")
    X, Y, Z = param.shape[-3:]
    n = param.numel()
    if n:
        _tv_kernel[_grid(n, BLOCK)](param.detach(), grad, _scalars(grad, wx, wy, wz), X, Y, Z, n,
                                    DENSE=bool(dense_mode), BLOCK=BLOCK)
    return grad


# --------------------------------------------------------------------------------- distortion loss
@triton.jit
def _dist_fwd(w_ptr, m_ptr, iv_ptr, starts_ptr, counts_ptr, loss_ptr, wsum_ptr, wmsum_ptr, n_rays, max_n,
              IV_TENSOR: tl.constexpr, BLOCK_R: tl.constexpr):
    r, rm, start, count = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    A = tl.zeros([BLOCK_R], dtype=w_ptr.dtype.element_ty)  # sum of w before this sample
    B = tl.zeros_like(A)  # sum of w * m before this sample
    loss = tl.zeros_like(A)
    for k in range(0, max_n):
        msk = rm & (k < count)
        w = tl.load(w_ptr + start + k, mask=msk, other=0.0)
        s = tl.load(m_ptr + start + k, mask=msk, other=0.0)
        iv = _interval(iv_ptr, start + k, msk, IV_TENSOR)
        loss += 2.0 * w * (s * A - B) + iv * w * w / 3.0
        A += w
        B += w * s
    tl.store(loss_ptr + r, loss, mask=rm)
    tl.store(wsum_ptr + r, A, mask=rm)
    tl.store(wmsum_ptr + r, B, mask=rm)


@triton.jit
def _dist_bwd(w_ptr, m_ptr, iv_ptr, starts_ptr, counts_ptr, wsum_ptr, wmsum_ptr, gw_ptr, gm_ptr, giv_ptr,
              g_ptr, n_rays, max_n, IV_TENSOR: tl.constexpr, BLOCK_R: tl.constexpr):
    # d/dw_k = 2 (m_k (2 A_k - W) + WM - 2 B_k) + 2/3 iv_k w_k ; d/dm_k = 2 w_k (2 A_k + w_k - W)
    gscale = tl.load(g_ptr)  # upstream gradient / n_rays
    r, rm, start, count = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    W = tl.load(wsum_ptr + r, mask=rm, other=0.0)
    WM = tl.load(wmsum_ptr + r, mask=rm, other=0.0)
    A = tl.zeros_like(W)
    B = tl.zeros_like(W)
    for k in range(0, max_n):
        msk = rm & (k < count)
        w = tl.load(w_ptr + start + k, mask=msk, other=0.0)
        s = tl.load(m_ptr + start + k, mask=msk, other=0.0)
        iv = _interval(iv_ptr, start + k, msk, IV_TENSOR)
        if IV_TENSOR:
            tl.store(giv_ptr + start + k, gscale * w * w / 3.0, mask=msk)
        tl.store(gw_ptr + start + k, gscale * (2.0 * (s * (2.0 * A - W) + WM - 2.0 * B) + 2.0 * iv * w / 3.0), mask=msk)
        tl.store(gm_ptr + start + k, gscale * 2.0 * w * (2.0 * A + w - W), mask=msk)
        A += w
        B += w * s


class _Distortion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, m, interval, ray_id, n_rays):
        w, m = w.contiguous(), m.contiguous()
        iv_tensor = torch.is_tensor(interval) and interval.dim() > 0
        iv = interval.to(w).expand_as(w).contiguous() if iv_tensor else _scalars(w, interval)
        starts, counts, max_n = _layout(ray_id, n_rays)
        loss, W, WM = w.new_zeros(n_rays), w.new_zeros(n_rays), w.new_zeros(n_rays)
        if n_rays:
            _dist_fwd[_grid(n_rays, BLOCK_R)](w, m, iv, starts, counts, loss, W, WM, n_rays, max_n,
                                              IV_TENSOR=iv_tensor, BLOCK_R=BLOCK_R)
        ctx.save_for_backward(w, m, iv, starts, counts, W, WM)
        ctx.iv_tensor, ctx.max_n = iv_tensor, max_n
        ctx.interval_shape = interval.shape if iv_tensor else None
        return loss.sum() / max(n_rays, 1)

    @staticmethod
    def backward(ctx, g):
        w, m, iv, starts, counts, W, WM = ctx.saved_tensors
        n_rays = counts.numel()
        gw, gm = torch.zeros_like(w), torch.zeros_like(m)
        giv = torch.zeros_like(w) if ctx.iv_tensor else w
        if n_rays:
            gscale = (g.detach() / n_rays).to(w).reshape(1).contiguous()
            _dist_bwd[_grid(n_rays, BLOCK_R)](w, m, iv, starts, counts, W, WM, gw, gm, giv, gscale, n_rays,
                                              ctx.max_n, IV_TENSOR=ctx.iv_tensor, BLOCK_R=BLOCK_R)
        g_iv = None
        if ctx.iv_tensor:
            g_iv = giv.sum_to_size(ctx.interval_shape)
        return gw, gm, g_iv, None, None


def distortion_loss(weights, s, interval, ray_id, n_rays):
    return _Distortion.apply(weights, s, interval, ray_id, n_rays)


# ------------------------------------------------------------------------------------------ grid Adam
@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, lr_ptr, n_lr, h_ptr, n,
                 HAS_LR: tl.constexpr, SKIP_ZERO: tl.constexpr, FP32: tl.constexpr, BLOCK: tl.constexpr):
    beta1, one_m_beta1, beta2 = tl.load(h_ptr), tl.load(h_ptr + 1), tl.load(h_ptr + 2)
    one_m_beta2, eps, step_size = tl.load(h_ptr + 3), tl.load(h_ptr + 4), tl.load(h_ptr + 5)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = i < n
    g = tl.load(g_ptr + i, mask=msk, other=0.0)
    if SKIP_ZERO:
        msk = msk & (g != 0.0)
    m = tl.load(m_ptr + i, mask=msk, other=0.0) * beta1 + g * one_m_beta1
    v = tl.load(v_ptr + i, mask=msk, other=0.0) * beta2 + g * g * one_m_beta2
    if FP32:
        root = tl.sqrt_rn(v)  # IEEE-rounded, as torch's (tl.sqrt may be approximate on GPUs)
    else:
        root = tl.sqrt(v)
    upd = step_size * m / (root + eps)
    if HAS_LR:
        upd = upd * tl.load(lr_ptr + i % n_lr, mask=msk, other=0.0)
    p = tl.load(p_ptr + i, mask=msk, other=0.0)
    tl.store(m_ptr + i, m, mask=msk)
    tl.store(v_ptr + i, v, mask=msk)
    tl.store(p_ptr + i, p - upd, mask=msk)


def grid_adam_step(param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size, skip_zero_grad, per_lr):
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"grid_adam_step: {name} must be contiguous")
    lr = param if per_lr is None else per_lr.to(param).contiguous()
    if per_lr is not None and not _broadcasts_over_leading_dims(lr.shape, param.shape):
        lr = lr.expand_as(param).contiguous()  # any other broadcast: materialise it
    n_lr = lr.numel()
    n = param.numel()
    if n:
        hyper = _scalars(param, beta1, 1 - beta1, beta2, 1 - beta2, eps, step_size)
        _adam_kernel[_grid(n, BLOCK)](param.data, grad, exp_avg, exp_avg_sq, lr, n_lr, hyper, n, HAS_LR=per_lr is not None,
                                      SKIP_ZERO=bool(skip_zero_grad), FP32=param.dtype == torch.float32, BLOCK=BLOCK)


def _broadcasts_over_leading_dims(small: torch.Size, big: torch.Size) -> bool:
    """True when ``small`` (leading 1s dropped) equals ``big``'s trailing dims: then flat index i of ``big``
    reads ``small`` at ``i % small.numel()``."""
    dims = list(small)
    while dims and dims[0] == 1:
        dims.pop(0)
    return not dims or tuple(dims) == tuple(big[len(big) - len(dims):])
