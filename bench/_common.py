"""Shared by the bench scripts (imported as a sibling module: ``python bench/<script>.py``)."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python bench/<script>.py`` finds ``src`` with or without ``pip install -e .``
    sys.path.insert(0, str(ROOT))
CUDA = torch.cuda.is_available()


def add_speed_args(parser) -> None:
    """The options every speed bench takes: timed training steps and the output file."""
    parser.add_argument("--train-steps", type=int, default=5 if not CUDA else 50, help="timed training steps")
    parser.add_argument("--out", default=None, help="result file (default bench/results/<name>_<cpu|gpu>.md)")


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else f"CPU ({torch.get_num_threads()} threads)"


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


def steps_per_second(step: Callable[[], None], steps: int) -> float:
    """``1 / median`` seconds of ``steps`` calls of ``step`` (one training step), after one warm-up call."""
    times = []
    for i in range(steps + 1):
        sync()
        tic = time.perf_counter()
        step()
        sync()
        if i:
            times.append(time.perf_counter() - tic)
    return 1.0 / statistics.median(times)


def optimizer_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], lr: float) -> Callable[[], None]:
    """A training step of Adam on ``loss_fn()`` for :func:`steps_per_second`."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def render_rate(model, rays_o: torch.Tensor, rays_d: torch.Tensor, full_height: int) -> dict:
    """Time ``model.render_image`` on rows of rays (R, W, 3); a whole image when R equals ``full_height``."""
    rows, w = rays_o.shape[:2]
    sync()
    tic = time.perf_counter()
    model.render_image(rays_o, rays_d)
    sync()
    seconds = time.perf_counter() - tic
    return {"rays": rows * w, "ms_per_ray": seconds / (rows * w) * 1e3, "full": rows == full_height,
            "s_per_img": seconds if rows == full_height else None}
