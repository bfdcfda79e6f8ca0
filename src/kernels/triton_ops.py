"""Triton implementations of the ops in :mod:`src.kernels.reference` (same signatures, same results).

Imported only when a ``triton`` backend is first used. Runs on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported (how the tests check it without a GPU).

Layout: samples of a batch of rays are flat, grouped by a sorted ``ray_id``. Per-ray kernels give each
ray one lane (``BLOCK_R`` rays per program) and walk its samples front to back (or back to front in a
backward pass), as DVGO's CUDA kernels give each ray one thread; each program loops to the longest ray of
its own block (a reduction inside the kernel, so the host never waits to read a count).

Scalar parameters are kernel arguments typed ``fp64`` and cast to the data's dtype inside the kernel (as
torch casts a Python scalar to the tensor's dtype), so no tensor is made per call and float64 inputs are
computed in float64 throughout.

:func:`launch_variants` lists every (kernel, signature, constexprs, options) the wrappers here launch;
``python -m src.kernels.compile_check`` compiles each for a GPU target on any machine (tests do, for
sm_80 and sm_90). A kernel launched here without an entry there fails that test.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from src.kernels.reference import ray_layout, ray_steps

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Block sizes change only how work is split over programs, never a result. The interpreter runs programs
# one after another, so it gets few large ones.
GPU_BLOCK, GPU_BLOCK_R = 1024, 64
BLOCK = 65536 if _INTERPRET else GPU_BLOCK  # elements per program, elementwise kernels
BLOCK_R = 4096 if _INTERPRET else GPU_BLOCK_R  # rays per program, per-ray kernels
SEGSUM_BLOCK_C = (1, 2, 4, 8, 16)  # channels per program of segment_sum (wider values use more programs)
DTYPES = {torch.float32: "fp32", torch.float64: "fp64"}

# The ray-box and sampling kernels decide which samples exist, so they round as torch does: no fused
# multiply-add and IEEE round-to-nearest division (tl.div_rn). They then produce the reference's samples
# bit for bit on a GPU too. The other kernels may fuse; their results agree with torch to rounding.
EXACT = ("_ray_aabb_kernel", "_sample_kernel")


def _options(kernel_name: str) -> dict:
    return {"enable_fp_fusion": kernel_name not in EXACT}


def _grid(n: int, block: int) -> tuple[int]:
    return (max(triton.cdiv(n, block), 1),)


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"triton kernels take float32 or float64 tensors, got {t.dtype} (use kernels=torch)")


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
def _as(value, like):
    """A scalar argument (fp64) in the dtype of tensor ``like``."""
    return tl.full([], value, like.dtype)


@triton.jit
def _div_rn(a, b):
    """a / b rounded to nearest, as torch divides (tl.div_rn is float32-only; float64 division already is)."""
    if a.dtype == tl.float32:
        q = tl.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _sqrt_rn(x):
    """IEEE-rounded square root, as torch's (tl.sqrt may be approximate on GPUs in float32)."""
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R: tl.constexpr):
    """This program's rays (one lane each): ray index, lane mask, first sample, sample count, and the
    largest count in the block (the loop bound)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rays
    count = tl.load(counts_ptr + r, mask=rm, other=0)
    return r, rm, tl.load(starts_ptr + r, mask=rm, other=0), count, tl.max(count, axis=0)


# ------------------------------------------------------------------------------------------ raw2alpha
@triton.jit
def _raw2alpha_fwd_kernel(x_ptr, out_ptr, shift: tl.float64, interval: tl.float64, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x + _as(shift, x)
    tl.store(out_ptr + offs, _neg_expm1_neg(_softplus(x) * _as(interval, x)), mask=mask)


@triton.jit
def _raw2alpha_bwd_kernel(x_ptr, gout_ptr, gin_ptr, shift: tl.float64, interval: tl.float64, n,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x + _as(shift, x)
    iv = _as(interval, x)
    g = tl.load(gout_ptr + offs, mask=mask, other=0.0)
    # d alpha / d x = interval * (1 - alpha) * sigmoid(x), with 1 - alpha = exp(-interval softplus(x))
    tl.store(gin_ptr + offs, g * iv * tl.exp(-iv * _softplus(x)) * tl.sigmoid(x), mask=mask)


class _Raw2Alpha(torch.autograd.Function):
    @staticmethod
    def forward(ctx, density, shift, interval):
        x = density.contiguous()
        _check_dtype(x)
        out = torch.empty_like(x)
        _raw2alpha_fwd_kernel[_grid(x.numel(), BLOCK)](x, out, shift, interval, x.numel(), BLOCK=BLOCK,
                                                       **_options("_raw2alpha_fwd_kernel"))
        ctx.save_for_backward(x)
        ctx.scalars = (shift, interval)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_in = torch.empty_like(x)
        _raw2alpha_bwd_kernel[_grid(x.numel(), BLOCK)](x, grad_out.contiguous(), grad_in, *ctx.scalars, x.numel(),
                                                       BLOCK=BLOCK, **_options("_raw2alpha_bwd_kernel"))
        return grad_in, None, None


def raw2alpha(density: torch.Tensor, shift: float | torch.Tensor, interval: float) -> torch.Tensor:
    """The Triton kernel of :func:`src.kernels.reference.raw2alpha`: the same contract, CUDA tensors."""
    return _Raw2Alpha.apply(density, float(shift), float(interval))


# ----------------------------------------------------------------------------------- alpha_to_weights
@triton.jit
def _alpha2w_fwd_kernel(alpha_ptr, starts_ptr, counts_ptr, w_ptr, T_ptr, Tlast_ptr, stop_T: tl.float64, n_rays,
                        BLOCK_R: tl.constexpr):
    r, rm, start, count, max_n = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    trans = tl.zeros([BLOCK_R], dtype=alpha_ptr.dtype.element_ty) + 1.0
    stop = _as(stop_T, trans)
    for k in range(0, max_n):
        m = rm & (k < count)
        a = tl.load(alpha_ptr + start + k, mask=m, other=0.0)
        a = tl.where(trans >= stop, a, 0.0)  # early ray termination: past it, samples add nothing
        tl.store(T_ptr + start + k, trans, mask=m)
        tl.store(w_ptr + start + k, trans * a, mask=m)
        trans = trans * (1.0 - a)
    tl.store(Tlast_ptr + r, trans, mask=rm)


@triton.jit
def _alpha2w_bwd_kernel(alpha_ptr, T_ptr, starts_ptr, counts_ptr, gw_ptr, gT_ptr, gTlast_ptr, galpha_ptr,
                        stop_T: tl.float64, n_rays, BLOCK_R: tl.constexpr):
    # dL/da_k = T_k (gw_k - R_k), R_k = sum_{i>k} (gw_i a_i + gT_i) prod_{k<j<i} (1 - a_j) + gTlast prod_{j>k} (1 - a_j)
    # accumulated back to front: R_{k-1} = gw_k a_k + gT_k + (1 - a_k) R_k; no division by (1 - a).
    # Terminated samples (T_k < stop_T) have a = 0 in the forward pass and no gradient.
    r, rm, start, count, max_n = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    R = tl.load(gTlast_ptr + r, mask=rm, other=0.0)
    stop = _as(stop_T, R)
    for kk in range(0, max_n):
        k = count - 1 - kk
        m = rm & (k >= 0)
        a = tl.load(alpha_ptr + start + k, mask=m, other=0.0)
        t = tl.load(T_ptr + start + k, mask=m, other=0.0)
        gw = tl.load(gw_ptr + start + k, mask=m, other=0.0)
        gt = tl.load(gT_ptr + start + k, mask=m, other=0.0)
        alive = t >= stop
        a = tl.where(alive, a, 0.0)
        tl.store(galpha_ptr + start + k, tl.where(alive, t * (gw - R), 0.0), mask=m)
        R = tl.where(m, gw * a + gt + (1.0 - a) * R, R)


class _AlphaToWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alpha, ray_id, n_rays, stop_T):
        alpha = alpha.contiguous()
        _check_dtype(alpha)
        _, counts, starts = ray_layout(ray_id, n_rays)
        w, T = torch.empty_like(alpha), torch.empty_like(alpha)
        T_last = alpha.new_empty(n_rays)
        if n_rays:
            _alpha2w_fwd_kernel[_grid(n_rays, BLOCK_R)](alpha, starts, counts, w, T, T_last, stop_T, n_rays,
                                                        BLOCK_R=BLOCK_R, **_options("_alpha2w_fwd_kernel"))
        ctx.save_for_backward(alpha, T, starts, counts)
        ctx.stop_T = stop_T
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
            _alpha2w_bwd_kernel[_grid(n_rays, BLOCK_R)](alpha, T, starts, counts, gw, gT, gTlast, galpha, ctx.stop_T,
                                                        n_rays, BLOCK_R=BLOCK_R, **_options("_alpha2w_bwd_kernel"))
        return galpha, None, None, None


def alpha_to_weights(alpha: torch.Tensor, ray_id: torch.Tensor, n_rays: int,
                     stop_T: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel of :func:`src.kernels.reference.alpha_to_weights`: the same contract, CUDA tensors."""
    return _AlphaToWeights.apply(alpha, ray_id, n_rays, float(stop_T))


# ---------------------------------------------------------------------------------------- segment_sum
@triton.jit
def _segsum_kernel(v_ptr, starts_ptr, counts_ptr, out_ptr, n_rays, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, rm, start, count, max_n = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
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
        _check_dtype(v)
        C = v.shape[1]
        _, counts, starts = ray_layout(ray_id, n_rays)
        out = v.new_zeros(n_rays, C)
        if n_rays and C:
            block_c = min(triton.next_power_of_2(C), SEGSUM_BLOCK_C[-1])
            grid = (_grid(n_rays, BLOCK_R)[0], triton.cdiv(C, block_c))
            _segsum_kernel[grid](v, starts, counts, out, n_rays, C, BLOCK_R=BLOCK_R, BLOCK_C=block_c,
                                 **_options("_segsum_kernel"))
        ctx.save_for_backward(ray_id)
        return out.reshape(n_rays, *shape[1:])

    @staticmethod
    def backward(ctx, grad_out):
        (ray_id,) = ctx.saved_tensors
        return grad_out[ray_id], None, None  # a gather: one torch indexing op is already optimal


def segment_sum(values: torch.Tensor, ray_id: torch.Tensor, n_rays: int) -> torch.Tensor:
    """The Triton kernel of :func:`src.kernels.reference.segment_sum`: the same contract, CUDA tensors."""
    return _SegmentSum.apply(values, ray_id, n_rays)


# --------------------------------------------------------------------------- ray-box and ray sampling
@triton.jit
def _slab(o, d, lo, hi):
    d = tl.where(d == 0.0, 1e-6, d)
    ta = _div_rn(hi - o, d)
    tb = _div_rn(lo - o, d)
    return tl.minimum(ta, tb), tl.maximum(ta, tb)


@triton.jit
def _ray_aabb_kernel(o_ptr, d_ptr, lo_ptr, hi_ptr, tmin_ptr, tmax_ptr, near: tl.float64, far: tl.float64, n,
                     BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = r < n
    lo_x, hi_x = _slab(tl.load(o_ptr + 3 * r, mask=m, other=0.0), tl.load(d_ptr + 3 * r, mask=m, other=1.0),
                       tl.load(lo_ptr), tl.load(hi_ptr))
    lo_y, hi_y = _slab(tl.load(o_ptr + 3 * r + 1, mask=m, other=0.0), tl.load(d_ptr + 3 * r + 1, mask=m, other=1.0),
                       tl.load(lo_ptr + 1), tl.load(hi_ptr + 1))
    lo_z, hi_z = _slab(tl.load(o_ptr + 3 * r + 2, mask=m, other=0.0), tl.load(d_ptr + 3 * r + 2, mask=m, other=1.0),
                       tl.load(lo_ptr + 2), tl.load(hi_ptr + 2))
    t_near, t_far = _as(near, lo_x), _as(far, lo_x)
    t_min = tl.minimum(tl.maximum(tl.maximum(tl.maximum(lo_x, lo_y), lo_z), t_near), t_far)
    t_max = tl.minimum(tl.maximum(tl.minimum(tl.minimum(hi_x, hi_y), hi_z), t_near), t_far)
    tl.store(tmin_ptr + r, t_min, mask=m)
    tl.store(tmax_ptr + r, t_max, mask=m)


def _box(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype).contiguous()  # no copy when it already is


def ray_aabb(rays_o: torch.Tensor, rays_d: torch.Tensor, xyz_min: torch.Tensor, xyz_max: torch.Tensor, near: float,
             far: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel of :func:`src.kernels.reference.ray_aabb`: the same contract, CUDA tensors."""
    o, d = rays_o.contiguous(), rays_d.contiguous()
    _check_dtype(o)
    n = o.shape[0]
    t_min, t_max = o.new_empty(n), o.new_empty(n)
    if n:
        _ray_aabb_kernel[_grid(n, BLOCK)](o, d, _box(xyz_min, o), _box(xyz_max, o), t_min, t_max, float(near),
                                          float(far), n, BLOCK=BLOCK, **_options("_ray_aabb_kernel"))
    return t_min, t_max, t_max > t_min


@triton.jit
def _sample_kernel(o_ptr, d_ptr, lo_ptr, hi_ptr, tmin_ptr, dt_ptr, starts_ptr, nsteps_ptr, pts_ptr, rid_ptr, sid_ptr,
                   t_ptr, inside_ptr, n_rays, BLOCK_R: tl.constexpr):
    x0, y0, z0 = tl.load(lo_ptr), tl.load(lo_ptr + 1), tl.load(lo_ptr + 2)
    x1, y1, z1 = tl.load(hi_ptr), tl.load(hi_ptr + 1), tl.load(hi_ptr + 2)
    r, rm, start, count, max_n = _ray_lanes(starts_ptr, nsteps_ptr, n_rays, BLOCK_R)
    ox = tl.load(o_ptr + 3 * r, mask=rm, other=0.0)
    oy = tl.load(o_ptr + 3 * r + 1, mask=rm, other=0.0)
    oz = tl.load(o_ptr + 3 * r + 2, mask=rm, other=0.0)
    dx = tl.load(d_ptr + 3 * r, mask=rm, other=0.0)
    dy = tl.load(d_ptr + 3 * r + 1, mask=rm, other=0.0)
    dz = tl.load(d_ptr + 3 * r + 2, mask=rm, other=0.0)
    t0 = tl.load(tmin_ptr + r, mask=rm, other=0.0)
    dt = tl.load(dt_ptr + r, mask=rm, other=0.0)
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


def sample_pts_on_rays(rays_o: torch.Tensor, rays_d: torch.Tensor, xyz_min: torch.Tensor, xyz_max: torch.Tensor,
                       near: float, far: float, stepdist: float) -> dict[str, torch.Tensor]:
    """The Triton kernel of :func:`src.kernels.reference.sample_pts_on_rays`: the same contract, CUDA tensors."""
    o, d = rays_o.contiguous(), rays_d.contiguous()
    t_min, t_max, hit = ray_aabb(o, d, xyz_min, xyz_max, near, far)
    dt, n_steps = ray_steps(d, t_min, t_max, hit, stepdist)  # the reference's own counts
    starts = torch.cumsum(n_steps, 0) - n_steps
    M, n_rays = int(n_steps.sum()), o.shape[0]  # the one host read: the output's size
    pts = o.new_empty(M, 3)
    ray_id = torch.empty(M, dtype=torch.long, device=o.device)
    step_id = torch.empty_like(ray_id)
    t = o.new_empty(M)
    inside = torch.empty(M, dtype=torch.int8, device=o.device)
    if M:
        _sample_kernel[_grid(n_rays, BLOCK_R)](o, d, _box(xyz_min, o), _box(xyz_max, o), t_min, dt, starts, n_steps,
                                               pts, ray_id, step_id, t, inside, n_rays, BLOCK_R=BLOCK_R,
                                               **_options("_sample_kernel"))
    keep = inside.bool()
    return {"pts": pts[keep], "ray_id": ray_id[keep], "step_id": step_id[keep], "t": t[keep], "n_steps": n_steps}


# --------------------------------------------------------------------------------- total variation
@triton.jit
def _clamp1(x):
    return tl.minimum(tl.maximum(x, -1.0), 1.0)  # tl.clamp does not lower in float64 on sm_90


@triton.jit
def _tv_kernel(p_ptr, g_ptr, wx: tl.float64, wy: tl.float64, wz: tl.float64, X, Y, Z, n, DENSE: tl.constexpr,
               BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    z = i % Z
    y = (i // Z) % Y
    x = (i // (Y * Z)) % X
    p = tl.load(p_ptr + i, mask=m, other=0.0)
    wx, wy, wz = _as(wx, p), _as(wy, p), _as(wz, p)
    add = tl.zeros_like(p)
    add += tl.where(z > 0, wz * _clamp1(p - tl.load(p_ptr + i - 1, mask=m & (z > 0), other=0.0)), 0.0)
    add += tl.where(z < Z - 1, wz * _clamp1(p - tl.load(p_ptr + i + 1, mask=m & (z < Z - 1), other=0.0)), 0.0)
    add += tl.where(y > 0, wy * _clamp1(p - tl.load(p_ptr + i - Z, mask=m & (y > 0), other=0.0)), 0.0)
    add += tl.where(y < Y - 1, wy * _clamp1(p - tl.load(p_ptr + i + Z, mask=m & (y < Y - 1), other=0.0)), 0.0)
    add += tl.where(x > 0, wx * _clamp1(p - tl.load(p_ptr + i - Y * Z, mask=m & (x > 0), other=0.0)), 0.0)
    add += tl.where(x < X - 1, wx * _clamp1(p - tl.load(p_ptr + i + Y * Z, mask=m & (x < X - 1), other=0.0)), 0.0)
    g = tl.load(g_ptr + i, mask=m, other=0.0)
    if DENSE:
        tl.store(g_ptr + i, g + add, mask=m)
    else:
        tl.store(g_ptr + i, g + add, mask=m & (g != 0.0))


def total_variation_add_grad(param: torch.Tensor, grad: torch.Tensor, wx: float, wy: float, wz: float,
                             dense_mode: bool) -> torch.Tensor:
    """The Triton kernel of :func:`src.kernels.reference.total_variation_add_grad`: the same contract, CUDA tensors."""
    if not (param.is_contiguous() and grad.is_contiguous()):
        raise ValueError("total_variation_add_grad: param and grad must be contiguous")
    _check_dtype(grad)
    X, Y, Z = param.shape[-3:]
    n = param.numel()
    if n:  # DVGO's CUDA op divides the weights by 6 (see the reference)
        _tv_kernel[_grid(n, BLOCK)](param.detach(), grad, wx / 6, wy / 6, wz / 6, X, Y, Z, n, DENSE=bool(dense_mode),
                                    BLOCK=BLOCK, **_options("_tv_kernel"))
    return grad


# --------------------------------------------------------------------------------- distortion loss
# IV: how the interval arrives. 0: a Python scalar (argument iv); 1: a one-element tensor; 2: one per sample.
@triton.jit
def _interval(iv_ptr, ivs, i, msk, IV: tl.constexpr):
    if IV == 0:
        iv = ivs
    else:
        iv = tl.load(iv_ptr + i * (IV - 1), mask=msk, other=0.0)
    return iv


@triton.jit
def _dist_fwd_kernel(w_ptr, m_ptr, iv_ptr, iv: tl.float64, starts_ptr, counts_ptr, loss_ptr, wsum_ptr, wmsum_ptr,
                     n_rays, IV: tl.constexpr, BLOCK_R: tl.constexpr):
    r, rm, start, count, max_n = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    A = tl.zeros([BLOCK_R], dtype=w_ptr.dtype.element_ty)  # sum of w before this sample
    B = tl.zeros_like(A)  # sum of w * m before this sample
    loss = tl.zeros_like(A)
    ivs = _as(iv, A)
    for k in range(0, max_n):
        msk = rm & (k < count)
        w = tl.load(w_ptr + start + k, mask=msk, other=0.0)
        s = tl.load(m_ptr + start + k, mask=msk, other=0.0)
        loss += 2.0 * w * (s * A - B) + _interval(iv_ptr, ivs, start + k, msk, IV) * w * w / 3.0
        A += w
        B += w * s
    tl.store(loss_ptr + r, loss, mask=rm)
    tl.store(wsum_ptr + r, A, mask=rm)
    tl.store(wmsum_ptr + r, B, mask=rm)


@triton.jit
def _dist_bwd_kernel(w_ptr, m_ptr, iv_ptr, iv: tl.float64, starts_ptr, counts_ptr, wsum_ptr, wmsum_ptr, gw_ptr,
                     gm_ptr, giv_ptr, g_ptr, n_rays, IV: tl.constexpr, BLOCK_R: tl.constexpr):
    # d/dw_k = 2 (m_k (2 A_k - W) + WM - 2 B_k) + 2/3 iv_k w_k ; d/dm_k = 2 w_k (2 A_k + w_k - W)
    gscale = tl.load(g_ptr)  # upstream gradient / n_rays
    r, rm, start, count, max_n = _ray_lanes(starts_ptr, counts_ptr, n_rays, BLOCK_R)
    W = tl.load(wsum_ptr + r, mask=rm, other=0.0)
    WM = tl.load(wmsum_ptr + r, mask=rm, other=0.0)
    A = tl.zeros_like(W)
    B = tl.zeros_like(W)
    ivs = _as(iv, W)
    for k in range(0, max_n):
        msk = rm & (k < count)
        w = tl.load(w_ptr + start + k, mask=msk, other=0.0)
        s = tl.load(m_ptr + start + k, mask=msk, other=0.0)
        ivk = _interval(iv_ptr, ivs, start + k, msk, IV)
        if IV != 0:  # the interval is a tensor: its gradient, per sample (summed later for a one-element one)
            tl.store(giv_ptr + start + k, gscale * w * w / 3.0, mask=msk)
        tl.store(gw_ptr + start + k, gscale * (2.0 * (s * (2.0 * A - W) + WM - 2.0 * B) + 2.0 * ivk * w / 3.0), mask=msk)
        tl.store(gm_ptr + start + k, gscale * 2.0 * w * (2.0 * A + w - W), mask=msk)
        A += w
        B += w * s


class _Distortion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, m, interval, ray_id, n_rays):
        w, m = w.contiguous(), m.contiguous()
        _check_dtype(w)
        iv_mode, iv_tensor, iv_scalar = 0, w, 0.0  # IV 0: a Python scalar (w stands in for the unused pointer)
        if not torch.is_tensor(interval):
            iv_scalar = float(interval)
        elif interval.numel() == 1:
            iv_mode, iv_tensor = 1, interval.to(w).reshape(1)
        else:
            iv_mode, iv_tensor = 2, interval.to(w).expand_as(w).contiguous()
        _, counts, starts = ray_layout(ray_id, n_rays)
        loss, W, WM = w.new_zeros(n_rays), w.new_zeros(n_rays), w.new_zeros(n_rays)
        if n_rays:
            _dist_fwd_kernel[_grid(n_rays, BLOCK_R)](w, m, iv_tensor, iv_scalar, starts, counts, loss, W, WM, n_rays,
                                                     IV=iv_mode, BLOCK_R=BLOCK_R, **_options("_dist_fwd_kernel"))
        ctx.save_for_backward(w, m, iv_tensor, starts, counts, W, WM)
        ctx.iv_mode, ctx.iv_scalar = iv_mode, iv_scalar
        ctx.interval_shape = interval.shape if iv_mode else None
        return loss.sum() / max(n_rays, 1)

    @staticmethod
    def backward(ctx, g):
        w, m, iv_tensor, starts, counts, W, WM = ctx.saved_tensors
        n_rays = counts.numel()
        gw, gm = torch.zeros_like(w), torch.zeros_like(m)
        giv = torch.zeros_like(w) if ctx.iv_mode else w
        if n_rays:
            gscale = (g.detach() / n_rays).to(w).reshape(1).contiguous()
            _dist_bwd_kernel[_grid(n_rays, BLOCK_R)](w, m, iv_tensor, ctx.iv_scalar, starts, counts, W, WM, gw, gm, giv,
                                                     gscale, n_rays, IV=ctx.iv_mode, BLOCK_R=BLOCK_R,
                                                     **_options("_dist_bwd_kernel"))
        g_iv = giv.sum_to_size(ctx.interval_shape) if ctx.iv_mode else None
        return gw, gm, g_iv, None, None


def distortion_loss(weights: torch.Tensor, s: torch.Tensor, interval: float | torch.Tensor, ray_id: torch.Tensor,
                    n_rays: int) -> torch.Tensor:
    """The Triton kernel of :func:`src.kernels.reference.distortion_loss`: the same contract, CUDA tensors."""
    return _Distortion.apply(weights, s, interval, ray_id, n_rays)


# ------------------------------------------------------------------------------------------ grid Adam
@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, lr_ptr, n_lr, beta1: tl.float64, beta2: tl.float64, eps: tl.float64,
                 step_size: tl.float64, n, HAS_LR: tl.constexpr, SKIP_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    msk = i < n
    g = tl.load(g_ptr + i, mask=msk, other=0.0)
    # the scalars as torch computes them: (1 - beta) in float64, then cast to the data's dtype
    b1, omb1, b2, omb2 = _as(beta1, g), _as(1.0 - beta1, g), _as(beta2, g), _as(1.0 - beta2, g)
    if SKIP_ZERO:
        msk = msk & (g != 0.0)
    m = tl.load(m_ptr + i, mask=msk, other=0.0) * b1 + g * omb1
    v = tl.load(v_ptr + i, mask=msk, other=0.0) * b2 + g * g * omb2
    upd = _as(step_size, g) * m / (_sqrt_rn(v) + _as(eps, g))
    if HAS_LR:
        upd = upd * tl.load(lr_ptr + i % n_lr, mask=msk, other=0.0)
    p = tl.load(p_ptr + i, mask=msk, other=0.0)
    tl.store(m_ptr + i, m, mask=msk)
    tl.store(v_ptr + i, v, mask=msk)
    tl.store(p_ptr + i, p - upd, mask=msk)


def grid_adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   beta1: float, beta2: float, eps: float, step_size: float, skip_zero_grad: bool,
                   per_lr: torch.Tensor | None) -> None:
    """The Triton kernel of :func:`src.kernels.reference.grid_adam_step`: the same contract, CUDA tensors."""
    for name, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"grid_adam_step: {name} must be contiguous")
    _check_dtype(param)
    lr = param if per_lr is None else per_lr.to(param).contiguous()
    if per_lr is not None and not _broadcasts_over_leading_dims(lr.shape, param.shape):
        lr = lr.expand_as(param).contiguous()  # any other broadcast: materialise it
    n = param.numel()
    if n:
        _adam_kernel[_grid(n, BLOCK)](param.data, grad, exp_avg, exp_avg_sq, lr, lr.numel(), float(beta1), float(beta2),
                                      float(eps), float(step_size), n, HAS_LR=per_lr is not None,
                                      SKIP_ZERO=bool(skip_zero_grad), BLOCK=BLOCK, **_options("_adam_kernel"))


def _broadcasts_over_leading_dims(small: torch.Size, big: torch.Size) -> bool:
    """True when ``small`` (leading 1s dropped) equals ``big``'s trailing dims: then flat index i of ``big``
    reads ``small`` at ``i % small.numel()``."""
    dims = list(small)
    while dims and dims[0] == 1:
        dims.pop(0)
    return not dims or tuple(dims) == tuple(big[len(big) - len(dims):])


# ------------------------------------------------------------------------------- launch variants
class Variant(NamedTuple):
    """One compiled form of a kernel: its parameter types in order (``*fp32`` a pointer, ``i32``, ``fp64``),
    its constexpr values, and the launch options the wrapper passes."""

    kernel: object
    types: tuple[str, ...]
    constexprs: dict
    options: dict

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__  # JIT or interpreted function

    def describe(self) -> str:
        return f"{self.name}[{' '.join(self.types)}; {self.constexprs}]"


def launch_variants() -> list[Variant]:
    """Every variant the wrappers above launch: each float dtype x each constexpr value they pass, with the
    GPU block sizes (integer arguments unspecialised, pointers 16-byte aligned, as torch allocates)."""
    out = []

    def add(kernel, types: str, **constexprs):
        v = Variant(kernel, tuple(types.split()), constexprs, {})
        out.append(v._replace(options=_options(v.name)))

    b, br = GPU_BLOCK, GPU_BLOCK_R  # the GPU sizes, also when this module is imported under the interpreter
    for D in DTYPES.values():
        add(_raw2alpha_fwd_kernel, f"*{D} *{D} fp64 fp64 i32", BLOCK=b)
        add(_raw2alpha_bwd_kernel, f"*{D} *{D} *{D} fp64 fp64 i32", BLOCK=b)
        add(_alpha2w_fwd_kernel, f"*{D} *i64 *i64 *{D} *{D} *{D} fp64 i32", BLOCK_R=br)
        add(_alpha2w_bwd_kernel, f"*{D} *{D} *i64 *i64 *{D} *{D} *{D} *{D} fp64 i32", BLOCK_R=br)
        for bc in SEGSUM_BLOCK_C:
            add(_segsum_kernel, f"*{D} *i64 *i64 *{D} i32 i32", BLOCK_R=br, BLOCK_C=bc)
        add(_ray_aabb_kernel, f"*{D} *{D} *{D} *{D} *{D} *{D} fp64 fp64 i32", BLOCK=b)
        add(_sample_kernel, f"*{D} *{D} *{D} *{D} *{D} *{D} *i64 *i64 *{D} *i64 *i64 *{D} *i8 i32", BLOCK_R=br)
        for dense in (False, True):
            add(_tv_kernel, f"*{D} *{D} fp64 fp64 fp64 i32 i32 i32 i32", DENSE=dense, BLOCK=b)
        for iv in (0, 1, 2):
            add(_dist_fwd_kernel, f"*{D} *{D} *{D} fp64 *i64 *i64 *{D} *{D} *{D} i32", IV=iv, BLOCK_R=br)
            add(_dist_bwd_kernel, f"*{D} *{D} *{D} fp64 *i64 *i64 *{D} *{D} *{D} *{D} *{D} *{D} i32", IV=iv, BLOCK_R=br)
        for has_lr in (False, True):
            for skip in (False, True):
                add(_adam_kernel, f"*{D} *{D} *{D} *{D} *{D} i32 fp64 fp64 fp64 fp64 i32", HAS_LR=has_lr,
                    SKIP_ZERO=skip, BLOCK=b)
    return out
