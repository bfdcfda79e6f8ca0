"""Hot ops behind one seam: a pure-torch reference (the specification, and the CPU path) per op, a Triton
implementation for GPUs, and a backend switch.

Every op is called through its public function here, which dispatches on the backend chosen for it:

- ``torch``: :mod:`src.kernels.reference`;
- ``triton``: :mod:`src.kernels.triton_ops` (imported on first use; needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before Python starts - the interpreter is for checking, not speed);
- ``auto`` (default): ``triton`` for CUDA tensors when triton is importable, ``torch`` otherwise - guarded:
  the first call of each op on CUDA tensors runs the Triton kernel and the torch reference on copies of
  the real arguments and compares values and gradients (:mod:`src.kernels.parity`); on a compile error,
  an exception or a mismatch it logs a warning naming the op and the reason, and that op runs the
  reference for the rest of the run (``used_backends``: ``torch (fallback: <reason>)``).
  ``triton`` is strict: its errors propagate, and nothing is compared.

``set_backend("triton", raw2alpha="torch")`` picks a backend for every op and overrides some;
:func:`used_backends` reports what each op actually ran (``metrics.json`` records it).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
from typing import Callable, Iterator

import torch

from src.kernels import reference

OPS = ("raw2alpha", "alpha_to_weights", "segment_sum", "ray_aabb", "sample_pts_on_rays", "total_variation_add_grad",
       "distortion_loss", "grid_adam_step")
BACKENDS = ("auto", "torch", "triton")

_ACTIVE: dict[str, str] = {op: "auto" for op in OPS}
_USED: dict[str, str] = {}
_TRITON: dict[str, object] = {}
_GUARD: dict[str, str] = {}  # op -> "triton" (checked against the reference) or "torch (fallback: ...)"
log = logging.getLogger(__name__)


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (looked up once)."""
    if "available" not in _TRITON:
        _TRITON["available"] = importlib.util.find_spec("triton") is not None
    return bool(_TRITON["available"])


def _triton_ops():
    if "module" not in _TRITON:
        _TRITON["module"] = importlib.import_module("src.kernels.triton_ops")
    return _TRITON["module"]


def set_backend(backend: str = "auto", **per_op: str | None) -> None:
    """Select ``backend`` for every op, then ``per_op`` overrides (``alpha_to_weights="torch"``; None: no override)."""
    choice = {op: backend for op in OPS}
    for op, b in per_op.items():
        if op not in OPS:
            raise KeyError(f"unknown kernel op '{op}'; ops are {OPS}")
        if b is not None:
            choice[op] = b
    for op, b in choice.items():
        if b not in BACKENDS:
            raise ValueError(f"kernel op '{op}': unknown backend '{b}' (choose from {BACKENDS})")
        if b == "triton" and not triton_available():
            raise RuntimeError(f"kernel op '{op}': backend 'triton' requested but triton is not installed "
                               "(pip install triton; it ships with CUDA builds of torch)")
    _ACTIVE.update(choice)
    _USED.clear()
    _GUARD.clear()


def active_backends() -> dict[str, str]:
    """The backend each op is set to (``auto`` resolves per call)."""
    return dict(_ACTIVE)


def used_backends() -> dict[str, str]:
    """The backend each op actually ran since the last :func:`set_backend`; ops not called yet report
    their setting as ``'<setting> (not called)'``."""
    return {op: _USED.get(op, f"{_ACTIVE[op]} (not called)") for op in OPS}


@contextlib.contextmanager
def use_backend(backend: str, **per_op: str | None) -> Iterator[None]:
    """:func:`set_backend` inside a ``with`` block; the previous backends (and their guard state) come back after."""
    saved, saved_used, saved_guard = dict(_ACTIVE), dict(_USED), dict(_GUARD)
    try:
        set_backend(backend, **per_op)
        yield
    finally:
        _ACTIVE.update(saved)
        _USED.clear()
        _USED.update(saved_used)
        _GUARD.clear()
        _GUARD.update(saved_guard)


def _auto_eligible(tensor: torch.Tensor) -> bool:
    """Whether ``auto`` tries Triton for this tensor (tests widen it to CPU tensors under the interpreter)."""
    return tensor.is_cuda and triton_available()


def _guarded(op: str, args: tuple) -> str:
    """``auto`` on an eligible tensor: the first call compares Triton with the reference on copies of the
    real arguments; the verdict holds for the rest of the run."""
    if op not in _GUARD:
        from src.kernels import parity

        try:
            fast = parity.run(getattr(_triton_ops(), op), op, args)
            ref = parity.run(getattr(reference, op), op, args)
            verdict = parity.compare(op, fast, ref)
            reason = "" if verdict.ok else f"mismatch: {verdict.reason}"
        except Exception as e:  # noqa: BLE001 - a compile error or a crash of the kernel: fall back
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        if reason:
            log.warning("kernel op '%s': the Triton kernel failed its check against the torch reference "
                        "(%s); using the torch reference for this op for the rest of the run", op, reason)
            _GUARD[op] = f"torch (fallback: {reason})"
        else:
            _GUARD[op] = "triton"
    return _GUARD[op]


def _impl(op: str, args: tuple) -> Callable:
    tensor = args[0]
    backend = _ACTIVE[op]
    if backend == "auto":
        backend = _guarded(op, args) if _auto_eligible(tensor) else "torch"
        _USED[op] = backend
        return getattr(_triton_ops() if backend == "triton" else reference, op)
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"kernel op '{op}': backend 'triton' runs on CUDA tensors; got a {tensor.device} tensor. "
                           "Use kernels=auto/torch on CPU, or set TRITON_INTERPRET=1 before starting Python "
                           "to check the Triton kernels on CPU (slow)")
    _USED[op] = backend
    return getattr(_triton_ops() if backend == "triton" else reference, op)


_CAPTURED: dict[str, tuple] | None = None


@contextlib.contextmanager
def capture() -> Iterator[dict[str, tuple]]:
    """While active, keep a copy of the arguments of each op's first call (tensors detached and cloned,
    ``requires_grad`` kept): real inputs for the kernel A/B check (``src.callbacks.kernel_ab``)."""
    global _CAPTURED
    saved, _CAPTURED = _CAPTURED, {}
    try:
        yield _CAPTURED
    finally:
        _CAPTURED = saved


def _call(op: str, *args):
    if _CAPTURED is not None and op not in _CAPTURED:
        _CAPTURED[op] = tuple(a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                              for a in args)
    return _impl(op, args)(*args)


def raw2alpha(density: torch.Tensor, shift: float | torch.Tensor, interval: float) -> torch.Tensor:
    """:func:`src.kernels.reference.raw2alpha` on the backend chosen for it (its docstring is copied here)."""
    return _call("raw2alpha", density, shift, interval)


def alpha_to_weights(alpha: torch.Tensor, ray_id: torch.Tensor, n_rays: int,
                     stop_T: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`src.kernels.reference.alpha_to_weights` on the backend chosen for it (its docstring is copied here)."""
    return _call("alpha_to_weights", alpha, ray_id, n_rays, stop_T)


def segment_sum(values: torch.Tensor, ray_id: torch.Tensor, n_rays: int) -> torch.Tensor:
    """:func:`src.kernels.reference.segment_sum` on the backend chosen for it (its docstring is copied here)."""
    return _call("segment_sum", values, ray_id, n_rays)


def ray_aabb(rays_o: torch.Tensor, rays_d: torch.Tensor, xyz_min: torch.Tensor, xyz_max: torch.Tensor, near: float,
             far: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`src.kernels.reference.ray_aabb` on the backend chosen for it (its docstring is copied here)."""
    return _call("ray_aabb", rays_o, rays_d, xyz_min, xyz_max, near, far)


def sample_pts_on_rays(rays_o: torch.Tensor, rays_d: torch.Tensor, xyz_min: torch.Tensor, xyz_max: torch.Tensor,
                       near: float, far: float, stepdist: float) -> dict[str, torch.Tensor]:
    """:func:`src.kernels.reference.sample_pts_on_rays` on the backend chosen for it (its docstring is copied here)."""
    return _call("sample_pts_on_rays", rays_o, rays_d, xyz_min, xyz_max, near, far, stepdist)


def total_variation_add_grad(param: torch.Tensor, grad: torch.Tensor, wx: float, wy: float, wz: float,
                             dense_mode: bool) -> torch.Tensor:
    """:func:`src.kernels.reference.total_variation_add_grad` on the backend chosen for it (its docstring is copied here)."""
    return _call("total_variation_add_grad", param, grad, wx, wy, wz, dense_mode)


def distortion_loss(weights: torch.Tensor, s: torch.Tensor, interval: float | torch.Tensor, ray_id: torch.Tensor,
                    n_rays: int) -> torch.Tensor:
    """:func:`src.kernels.reference.distortion_loss` on the backend chosen for it (its docstring is copied here)."""
    return _call("distortion_loss", weights, s, interval, ray_id, n_rays)


def grid_adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   beta1: float, beta2: float, eps: float, step_size: float, skip_zero_grad: bool,
                   per_lr: torch.Tensor | None) -> None:
    """:func:`src.kernels.reference.grid_adam_step` on the backend chosen for it (its docstring is copied here)."""
    return _call("grid_adam_step", param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size, skip_zero_grad,
                 per_lr)


for _op in OPS:
    globals()[_op].__doc__ = getattr(reference, _op).__doc__
