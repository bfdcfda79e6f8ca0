"""A fast kernel against its torch reference on the same arguments: run an op under a backend (outputs,
the state an in-place op changes, input gradients) and compare two such runs with a stated tolerance.

Shared by the guarded ``auto`` backend (:mod:`src.kernels`), the kernel A/B callback and ``bench/gpu.py``.

Tolerance. Floating outputs and gradients must satisfy ``|fast - ref| <= atol * max|ref| + rtol * |ref|``
elementwise (``rtol, atol`` = 1e-4, 1e-5 in float32; 1e-9, 1e-11 in float64): GPU transcendental functions
and fused multiply-adds differ from torch by rounding only. Where a result is a discrete decision on a
boundary - whether a sample is inside the box, whether a ray has terminated - rounding may flip a few
cases; for those ops (``BOUNDARY_OPS``) up to ``max(2, 1e-4 n)`` elements may differ, and sample sets are
matched by (ray, step) before their points are compared. Integer outputs must otherwise be equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DIFFERENTIABLE = {"raw2alpha", "alpha_to_weights", "segment_sum", "distortion_loss"}
IN_PLACE = {"total_variation_add_grad": (1,), "grid_adam_step": (0, 2, 3)}  # op -> indices of changed args
BOUNDARY_OPS = {"ray_aabb", "sample_pts_on_rays", "alpha_to_weights"}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(relative, absolute) tolerance of a fast kernel against the reference in ``dtype``."""
    return (1e-9, 1e-11) if dtype == torch.float64 else (1e-4, 1e-5)


def fresh(args: tuple) -> tuple:
    """Detached copies (``requires_grad`` kept): in-place ops must not touch the caller's tensors."""
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args)


def tensors(x: object) -> list[torch.Tensor]:
    """The tensors in ``x`` (a tensor, or dicts / tuples / lists of them, dict keys in order), flattened."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in tensors(x[k])]
    if isinstance(x, (tuple, list)):
        return [v for item in x for v in tensors(item)]
    return []


def run(fn: Callable, op: str, args: tuple) -> dict:
    """``fn(*args)`` on fresh copies: outputs (as returned, detached), changed state, input gradients.

    For a differentiable op every floating tensor input is made a leaf that requires grad, and the
    gradient of a fixed random weighting of the outputs is taken (the same weighting for every backend).
    Works inside ``inference_mode`` too (switched off here: the copies are ordinary tensors).
    """
    with torch.inference_mode(False):
        call_args = fresh(args)
        leaves = [a.requires_grad_(True) for a in call_args if op in DIFFERENTIABLE and torch.is_tensor(a)
                  and a.is_floating_point() and a.numel()]
        with torch.set_grad_enabled(bool(leaves)):
            out = fn(*call_args)
        grads = []
        outs = [t for t in tensors(out) if t.requires_grad]
        if leaves and outs:
            gen = torch.Generator(device=outs[0].device).manual_seed(0)
            loss = sum((o * torch.rand(o.shape, generator=gen, device=o.device, dtype=o.dtype)).sum() for o in outs)
            grads = [g if g is not None else torch.zeros_like(x)
                     for g, x in zip(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)]
    detached = {k: v.detach() for k, v in out.items()} if isinstance(out, dict) else [t.detach() for t in tensors(out)]
    return {"out": detached, "state": [call_args[i].detach() for i in IN_PLACE.get(op, ())], "grads": grads}


@dataclass
class Verdict:
    ok: bool
    max_abs_err: float = 0.0
    max_abs_grad_err: float | None = None
    n_differ: int = 0  # boundary elements (or samples) that differ, within the allowance
    reason: str = ""


def _allowance(op: str, n: int) -> int:
    return max(2, int(1e-4 * n)) if op in BOUNDARY_OPS else 0


def _elementwise(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """Elements outside tolerance, and the largest abs difference (over the elements within it)."""
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}")
    if not a.numel():
        return 0, 0.0
    if not a.is_floating_point():
        bad = a != b
        return int(bad.sum()), 0.0
    rtol, atol = tolerance(b.dtype)
    diff = (a.double() - b.double()).abs()
    floor = atol * float(b.abs().max()) + torch.finfo(b.dtype).tiny
    bad = ~(diff <= floor + rtol * b.double().abs())  # NaN counts as bad
    return int(bad.sum()), float(diff[~bad].max()) if bool((~bad).any()) else 0.0


def _sample_lists(fast: dict, ref: dict) -> tuple[list, list, int]:
    """Match samples by (ray, step): the matched points of both, and how many samples only one side has."""
    width = max(int(fast["n_steps"].max()), int(ref["n_steps"].max()), 0) + 1 if ref["n_steps"].numel() else 1
    kf = fast["ray_id"] * width + fast["step_id"]
    kr = ref["ray_id"] * width + ref["step_id"]
    idx = torch.searchsorted(kf, kr).clamp(max=max(kf.numel() - 1, 0))
    matched = (kf[idx] == kr) if kf.numel() else torch.zeros_like(kr, dtype=torch.bool)
    n_only = int((~matched).sum()) + (kf.numel() - int(matched.sum()))
    a = [fast[k][idx[matched]] for k in ("pts", "t")]
    b = [ref[k][matched] for k in ("pts", "t")]
    n_steps_differ = int((fast["n_steps"] != ref["n_steps"]).sum())
    return a, b, n_only + n_steps_differ


def compare(op: str, fast: dict, ref: dict) -> Verdict:
    """Does ``fast`` (a :func:`run` result) equal ``ref`` within the tolerance above?"""
    try:
        if op == "sample_pts_on_rays":
            a, b, n_differ = _sample_lists(fast["out"], ref["out"])
            n = ref["out"]["ray_id"].numel()
        elif op == "ray_aabb":
            (f_min, f_max, f_hit), (r_min, r_max, r_hit) = fast["out"], ref["out"]
            same = f_hit == r_hit
            a, b, n_differ, n = [f_min[same], f_max[same]], [r_min[same], r_max[same]], int((~same).sum()), r_hit.numel()
        else:
            a, b, n_differ = tensors(fast["out"]) + fast["state"], tensors(ref["out"]) + ref["state"], 0
            n = max((t.numel() for t in b), default=0)
        if len(a) != len(b):
            return Verdict(False, reason=f"{len(a)} outputs vs {len(b)} from the reference")
        errs = []
        for x, y in zip(a, b):
            bad, err = _elementwise(x, y)
            n_differ += bad
            errs.append(err)
        g_bad, g_errs = 0, []
        for x, y in zip(fast["grads"], ref["grads"]):
            bad, err = _elementwise(x, y)
            g_bad += bad
            g_errs.append(err)
        if len(fast["grads"]) != len(ref["grads"]):
            return Verdict(False, reason="gradients missing on one side")
    except ValueError as e:
        return Verdict(False, reason=str(e))
    verdict = Verdict(True, max(errs, default=0.0), max(g_errs, default=0.0) if ref["grads"] else None,
                      n_differ + g_bad)
    allowed = _allowance(op, n)
    if n_differ + g_bad > allowed:
        verdict.ok = False
        verdict.reason = (f"{n_differ} output and {g_bad} gradient elements outside tolerance "
                          f"(allowed {allowed}); max abs err within tolerance {verdict.max_abs_err:.2e}")
    return verdict
