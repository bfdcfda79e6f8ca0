"""What autograd graphs keep alive: the tensors saved by every node of the graphs of some roots."""
from __future__ import annotations

from collections import defaultdict

import torch


def storage_id(t: torch.Tensor) -> tuple:
    try:
        return t.device.type, t.untyped_storage().data_ptr()
    except RuntimeError:  # tensors without storage (sparse, some wrappers)
        return t.device.type, id(t)


def graph_saved_tensors(roots: list[torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """The tensors that the autograd graphs of ``roots`` keep alive: every node's saved tensors (``_saved_*``),
    one per storage, parameters (leaves that require grad) left out. {storage id: tensor}"""
    saved: dict[tuple, torch.Tensor] = {}
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set[int] = set()
    keep = []  # hold the nodes so that their ids stay unique while walking
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed by a backward pass
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and not (t.is_leaf and t.requires_grad):
                    saved.setdefault(storage_id(t), t)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return saved



def graph_groups(roots: list[torch.Tensor], steps: int) -> list[dict]:
    """The saved tensors that the graphs of ``roots`` keep alive (:func:`graph_saved_tensors`) grouped by
    (shape, dtype), largest first: count and bytes (of their storages) per step, and the tensors."""
    if not roots:
        return []
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in graph_saved_tensors(roots).values():
        groups[(tuple(t.shape), str(t.dtype).replace("torch.", ""))].append(t)
    out = [{"shape": shape, "dtype": dtype, "count_per_iter": len(ts) / steps,
            "bytes_per_iter": sum(t.untyped_storage().nbytes() for t in ts) / steps, "tensors": ts}
           for (shape, dtype), ts in groups.items()]
    return sorted(out, key=lambda g: -g["bytes_per_iter"])


