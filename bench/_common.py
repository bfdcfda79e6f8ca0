"""Shared by the bench scripts (imported as a sibling module: ``python bench/<script>.py``)."""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def emit(text: str, name: str, out: str | None = None) -> Path:
    """Print a result table and write it to ``out`` or ``bench/results/<name>_<gpu|cpu>.md``."""
    print(text)
    path = Path(out or ROOT / "bench" / "results" / f"{name}_{'gpu' if CUDA else 'cpu'}.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path
