"""Where tensors are made: the Python stack of every op's outputs while a :class:`CreationRecorder` is active,
the CUDA allocator's own history, and the project's or user's frames of a stack."""
from __future__ import annotations

import os
import sys
import warnings
from collections import Counter

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from src.callbacks.memory.graphs import storage_id

_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIP = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, L, os, warnings) if getattr(m, "__file__", None))
try:
    import lightning_utilities  # Lightning's helpers
    _SKIP += (os.path.dirname(lightning_utilities.__file__) + os.sep,)
except ImportError:  # pragma: no cover
    pass


def user_frames(frames: list[tuple[str, int, str]], limit: int = 3) -> list[tuple[str, int, str]]:
    """The innermost ``limit`` frames of ``frames`` (innermost first) outside torch, Lightning, the standard
    library and this package: the project's or the user's code."""
    def ours(path: str) -> bool:
        return not (path.startswith(_SKIP) or path.startswith(_HERE) or path.startswith("<") or "site-packages" in path
                    or "dist-packages" in path)
    out = [f for f in frames if ours(f[0])]
    return out[:limit]


def format_frames(frames: list[tuple[str, int, str]]) -> str:
    def short(path: str) -> str:
        try:
            rel = os.path.relpath(path)
            return rel if not rel.startswith("..") else path
        except ValueError:
            return path
    return " <- ".join(f"{short(f)}:{line} in {name}" for f, line, name in frames) or "(no project frame)"


class CreationRecorder(TorchDispatchMode):
    """While active, remembers the Python stack (innermost first) of every tensor an op makes, keyed by its
    storage; :meth:`where` looks a tensor up. Used for a few steps only: each op pays for a stack walk."""

    def __init__(self, depth: int = 40) -> None:
        super().__init__()
        self.depth = depth
        self.stacks: dict[tuple, tuple] = {}
        self._interned: dict[tuple, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        frame, frames = sys._getframe(1), []
        while frame is not None and len(frames) < self.depth:
            frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back
        frames = tuple(frames)
        frames = self._interned.setdefault(frames, frames)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if t._is_view():  # a view keeps the stack of the op that made its storage
                    self.stacks.setdefault(storage_id(t), frames)
                else:
                    self.stacks[storage_id(t)] = frames
        return out

    def where(self, t: torch.Tensor) -> list[tuple[str, int, str]] | None:
        frames = self.stacks.get(storage_id(t))
        return None if frames is None else list(frames)


def snapshot_frames(snapshot: dict) -> dict[int, list[tuple[str, int, str]]]:
    """{block address: frames (innermost first)} of the live blocks in a CUDA allocator snapshot
    (``torch.cuda.memory._snapshot()`` taken with history on)."""
    out = {}
    for seg in snapshot.get("segments", []):
        for block in seg.get("blocks", []):
            if block.get("state") == "active_allocated" and block.get("frames"):
                out[block["address"]] = [(f["filename"], f["line"], f["name"]) for f in block["frames"]]
    return out



def where_counts(tensors: list[torch.Tensor], where) -> Counter:
    """How many of ``tensors`` were made at each place (``where(t)``: frames or None), by their user frames."""
    return Counter(tuple(user_frames(f)) for f in (where(t) for t in tensors) if f is not None)
