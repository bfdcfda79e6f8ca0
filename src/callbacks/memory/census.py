"""Censuses of the tensors reachable from Python, by (shape, dtype, device), and what grew between two."""
from __future__ import annotations

import gc
import warnings
from collections import Counter

import torch


def tensor_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), str(t.dtype).replace("torch.", ""), str(t.device)


def live_tensors() -> list[torch.Tensor]:
    """Every tensor object reachable from Python (parameters and gradients included), each once. Collects
    garbage first: ``gc.get_objects()`` also returns unreachable cycles not yet collected (a finished run's
    module and its tensors, say), and a collection between two censuses would otherwise hide the growth."""
    gc.collect()
    out, seen = [], set()
    with warnings.catch_warnings():  # isinstance() on some library objects warns about deprecations
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and id(obj) not in seen:
                    seen.add(id(obj))
                    out.append(obj)
            except ReferenceError:  # dead weak proxies
                continue
    return out


def tensor_census(tensors: list[torch.Tensor] | None = None) -> Counter:
    """Live tensors reachable from Python counted by (shape, dtype, device): Counter[(shape, dtype, device)]."""
    return Counter(tensor_key(t) for t in (live_tensors() if tensors is None else tensors))


def element_size(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def _nbytes(shape: tuple, dtype: str) -> int:
    numel = 1
    for s in shape:
        numel *= s
    return numel * element_size(dtype)


def census_diff(before: Counter, after: Counter, steps: int) -> list[dict]:
    """What grew between two censuses ``steps`` apart, largest first: count and bytes per step."""
    rows = []
    for key in set(after) | set(before):
        delta = after[key] - before[key]
        if delta <= 0:
            continue
        shape, dtype, device = key
        rows.append({"shape": shape, "dtype": dtype, "device": device, "count": delta,
                     "count_per_iter": delta / steps, "bytes_per_iter": delta * _nbytes(shape, dtype) / steps})
    return sorted(rows, key=lambda r: -r["bytes_per_iter"])

