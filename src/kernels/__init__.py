"""Hot ops behind one seam: a pure-torch reference (the specification) per op, and a backend switch.

Every op is called through its public function here. Each dispatches to the implementation
registered for the active backend (``torch`` now; fast GPU backends register themselves in
``_IMPLS`` without touching callers). Backends are never imported at module import time.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from src.kernels import reference

OPS = ("raw2alpha", "alpha_to_weights", "segment_sum", "ray_aabb", "sample_pts_on_rays")

# op -> backend -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {op: {"torch": getattr(reference, op)} for op in OPS}
_ACTIVE: dict[str, str] = {op: "torch" for op in OPS}


def set_backend(backend: str, **per_op: str) -> None:
    """Select ``backend`` for every op, then ``per_op`` overrides (``alpha_to_weights="torch"``)."""
    choice = {op: backend for op in OPS}
    for op, b in per_op.items():
        if op not in OPS:
            raise KeyError(f"unknown kernel op '{op}'; ops are {OPS}")
        choice[op] = b
    for op, b in choice.items():
        if b not in _IMPLS[op]:
            raise ValueError(f"kernel op '{op}' has no backend '{b}' (available: {sorted(_IMPLS[op])})")
    _ACTIVE.update(choice)


def active_backends() -> dict[str, str]:
    """The backend each op uses now (recorded in metrics.json)."""
    return dict(_ACTIVE)


@contextlib.contextmanager
def use_backend(backend: str, **per_op: str) -> Iterator[None]:
    saved = dict(_ACTIVE)
    try:
        set_backend(backend, **per_op)
        yield
    finally:
        _ACTIVE.update(saved)


def raw2alpha(density, shift, interval):
    return _IMPLS["raw2alpha"][_ACTIVE["raw2alpha"]](density, shift, interval)


def alpha_to_weights(alpha, ray_id, n_rays):
    return _IMPLS["alpha_to_weights"][_ACTIVE["alpha_to_weights"]](alpha, ray_id, n_rays)


def segment_sum(values, ray_id, n_rays):
    return _IMPLS["segment_sum"][_ACTIVE["segment_sum"]](values, ray_id, n_rays)


def ray_aabb(rays_o, rays_d, xyz_min, xyz_max, near, far):
    return _IMPLS["ray_aabb"][_ACTIVE["ray_aabb"]](rays_o, rays_d, xyz_min, xyz_max, near, far)


def sample_pts_on_rays(rays_o, rays_d, xyz_min, xyz_max, near, far, stepdist):
    impl = _IMPLS["sample_pts_on_rays"][_ACTIVE["sample_pts_on_rays"]]
    return impl(rays_o, rays_d, xyz_min, xyz_max, near, far, stepdist)


raw2alpha.__doc__ = reference.raw2alpha.__doc__
alpha_to_weights.__doc__ = reference.alpha_to_weights.__doc__
segment_sum.__doc__ = reference.segment_sum.__doc__
ray_aabb.__doc__ = reference.ray_aabb.__doc__
sample_pts_on_rays.__doc__ = reference.sample_pts_on_rays.__doc__
