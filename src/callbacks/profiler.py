"""Profiler tables: ``torch.profiler`` over a window of training steps (and optionally validation steps).

Writes, under ``<out_dir>/profile/``: ``train_table.txt`` (the op table: top ``row_limit`` ops by self
device time, or self CPU time without a GPU, with call counts and memory), ``train_trace.json`` (Chrome
trace, open in chrome://tracing or Perfetto), and the same for validation (``val_*``) when
``profile_val``. With a W&B logger the table is also logged as a ``wandb.Table``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from src.loggers import wandb_loggers
from torch.profiler import ProfilerActivity, profile, schedule

log = logging.getLogger(__name__)


def op_rows(prof, sort_by: str, limit: int) -> list[dict]:
    """The profiler's key averages as plain rows (for W&B and tests)."""
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_by), reverse=True)[:limit]
    rows = []
    for e in events:
        rows.append({
            "name": e.key, "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3, "cpu_total_ms": e.cpu_time_total / 1e3,
            "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3,
            "self_cpu_mem_mb": e.self_cpu_memory_usage / 2**20,
            "self_device_mem_mb": getattr(e, "self_device_memory_usage", 0) / 2**20,
        })
    return rows


class ProfilerTable(L.Callback):
    """Args:
        out_dir: run dir (tables go to ``<out_dir>/profile/``).
        wait, warmup, active: the training window (``torch.profiler.schedule``), counted from ``start_step``.
        start_step: first training step of the window (skip set-up steps, e.g. DVGO's stage start).
        profile_val: also profile the first ``val_batches`` validation batches.
        row_limit: rows in the tables. record_shapes / profile_memory: passed to ``torch.profiler``.
    """

    def __init__(self, out_dir: str, wait: int = 1, warmup: int = 1, active: int = 3, start_step: int = 5,
                 profile_val: bool = False, val_batches: int = 2, row_limit: int = 30, record_shapes: bool = True,
                 profile_memory: bool = True) -> None:
        self.dir = Path(out_dir) / "profile"
        self.wait, self.warmup, self.active, self.start_step = wait, warmup, active, start_step
        self.profile_val, self.val_batches, self.row_limit = profile_val, val_batches, row_limit
        self.record_shapes, self.profile_memory = record_shapes, profile_memory
        self._prof = None
        self._val_prof = None
        self._done = {"train": False, "val": False}
        self.tables: dict[str, list[dict]] = {}

    def _new(self, sched=None):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        return profile(activities=activities, schedule=sched, record_shapes=self.record_shapes,
                       profile_memory=self.profile_memory)

    @property
    def _sort_key(self) -> str:
        return "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"

    def _write(self, prof, phase: str, trainer) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by=self._sort_key, row_limit=self.row_limit)
        first = self.start_step + self.wait + self.warmup
        window = f"steps {first}..{first + self.active - 1}" if phase == "train" else f"{self.val_batches} validation batches"
        header = f"# {phase}: torch.profiler op table, sorted by {self._sort_key} ({window})\n"
        (self.dir / f"{phase}_table.txt").write_text(header + table + "\n")
        prof.export_chrome_trace(str(self.dir / f"{phase}_trace.json"))
        self.tables[phase] = op_rows(prof, self._sort_key, self.row_limit)
        self._done[phase] = True
        log.info("profiler: wrote %s", self.dir / f"{phase}_table.txt")
        rows = self.tables[phase]
        for logger in wandb_loggers(trainer):
            logger.log_table(key=f"profile/{phase}_table", columns=list(rows[0]) if rows else ["name"],
                             data=[list(r.values()) for r in rows])

    # ---- training window ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._prof is None and not self._done["train"] and trainer.global_step >= self.start_step:
            sched = schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1)
            self._prof = self._new(sched)
            self._prof.__enter__()
            self._steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prof is None:
            return
        self._prof.step()
        self._steps += 1
        if self._steps >= self.wait + self.warmup + self.active:
            self._finish_train(trainer)

    def _finish_train(self, trainer) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self._write(prof, "train", trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._prof is not None:  # the run ended inside the window: write what was recorded
            self._finish_train(trainer)

    # ---- validation -----------------------------------------------------------------------------
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.profile_val and not self._done["val"] and not trainer.sanity_checking and self._val_prof is None:
            self._val_prof = self._new()
            self._val_prof.__enter__()
            self._val_seen = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._val_prof is None:
            return
        self._val_seen += 1
        if self._val_seen >= self.val_batches:
            self._finish_val(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_prof is not None:
            self._finish_val(trainer)

    def _finish_val(self, trainer) -> None:
        prof, self._val_prof = self._val_prof, None
        prof.__exit__(None, None, None)
        self._write(prof, "val", trainer)
