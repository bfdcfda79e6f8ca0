"""Throughput: iterations/s and rays/s (progress bar and logs), per training stage, as NeRF and NeuS training
logs report them.

Rays per step and stages come from the method (:class:`src.models.method.Method`: ``rays_per_step``, e.g. DVGO's
``n_rand``, and ``stage_name``). Test-time render seconds per image are logged by the ray methods
(``test/render_s_per_img``). ``summary()`` adds ``throughput/*`` keys to ``metrics.json``.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from src.callbacks import SummaryCallback
from src.models.method import Method


class Throughput(SummaryCallback):
    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._tic = 0.0
        self._recent: list[float] = []
        self.stage_time: dict[str, float] = defaultdict(float)
        self.stage_steps: dict[str, int] = defaultdict(int)
        self.rays_per_step: int | None = None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._tic = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        dt = time.perf_counter() - self._tic
        method = pl_module if isinstance(pl_module, Method) else None  # any LightningModule works; a Method says more
        stage = method.stage_name if method is not None else "train"
        self.stage_time[stage] += dt
        self.stage_steps[stage] += 1
        self._recent = (self._recent + [dt])[-self.window:]
        it_s = len(self._recent) / sum(self._recent)
        self.rays_per_step = method.rays_per_step if method is not None else None
        stats = {"perf/it_s": it_s}
        if self.rays_per_step:
            stats["perf/rays_s"] = it_s * self.rays_per_step
        pl_module.log_dict(stats, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

    # a run resumed from a checkpoint goes on counting (its metrics.json has every stage's figures)
    def state_dict(self) -> dict:
        return {"stage_time": dict(self.stage_time), "stage_steps": dict(self.stage_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.stage_time.update(state.get("stage_time", {}))
        self.stage_steps.update(state.get("stage_steps", {}))

    def summary(self) -> dict:
        out = {}
        steps, secs = sum(self.stage_steps.values()), sum(self.stage_time.values())
        if steps:
            out["throughput/it_s"] = round(steps / secs, 3)
            if self.rays_per_step:
                out["throughput/rays_s"] = round(steps / secs * self.rays_per_step, 1)
        for stage, n in self.stage_steps.items():
            out[f"throughput/{stage}_it_s"] = round(n / self.stage_time[stage], 3)
            out[f"throughput/{stage}_s"] = round(self.stage_time[stage], 2)
        return out
