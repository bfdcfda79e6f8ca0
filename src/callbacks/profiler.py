"""Profiler tables: ``torch.profiler`` over a window of training steps (and optionally validation steps).

Writes, under ``<out_dir>/profile/``: ``train_table.txt``: first the phase table (time per step and share of
the step of each phase the method marks with :func:`src.phases.phase` - its algorithm's parts, Lightning's
backward and optimizer - each phase counted outside the phases nested in it, with the unmarked rest of the
step as its own row), then the op table (top ``row_limit`` ops by self device time, or self CPU time without
a GPU, with call counts and memory); ``train_phases.json`` (the phase rows); ``train_trace.json`` (Chrome
trace, open in chrome://tracing or Perfetto); and the same for validation (``val_*``) when ``profile_val``.
A step is the span from the loop's batch-start hook to its batch-end hook (training: forward, backward and
optimizer step; data loading is outside it). With a W&B logger both tables are also logged as ``wandb.Table``.
On a GPU the times are CPU-side spans (kernels run asynchronously) and the device time of the kernels each
phase launched is its own column.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from src import phases
from src.loggers import wandb_loggers
from torch.autograd.profiler import record_function
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


STEP_MARK = "step#{}"  # the record_function range a loop's step is (step#train, step#val)


def phase_rows(prof, loop: str) -> tuple[list[dict], dict]:
    """The phase table of a profile: for each phase of :data:`src.phases.NAMES` seen inside the ``loop``'s
    step ranges, its time outside nested phases (CPU span, and on a GPU the device time of the kernels its ops
    launched), per step and as a share of the step; then the unmarked rest. Returns (rows, totals)."""
    step_name = STEP_MARK.format(loop)
    names = set(phases.NAMES)
    steps = [e for e in prof.events() if e.name == step_name]
    acc: dict[str, dict] = {}

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) or 0.0)

    def walk(e, owner: str | None):
        """Credit ``e``'s own time to ``owner``; a nested phase starts its own account."""
        for c in e.cpu_children:
            if c.name in names:
                row = acc.setdefault(c.name, {"cpu_us": 0.0, "device_us": 0.0, "calls": 0})
                row["calls"] += 1
                row["cpu_us"] += c.cpu_time_total
                if owner is not None:
                    acc[owner]["cpu_us"] -= c.cpu_time_total
                walk(c, c.name)
            else:
                if owner is not None:
                    acc[owner]["device_us"] += device_us(c)
                walk(c, owner)

    for st in steps:
        walk(st, None)
    n = max(1, len(steps))
    step_us = sum(st.cpu_time_total for st in steps) / n
    rows = [{"phase": k, "ms_per_step": v["cpu_us"] / n / 1e3, "share": v["cpu_us"] / n / step_us if step_us else 0.0,
             "calls_per_step": v["calls"] / n, "device_ms_per_step": v["device_us"] / n / 1e3}
            for k, v in sorted(acc.items(), key=lambda kv: -kv[1]["cpu_us"])]
    marked = sum(r["ms_per_step"] for r in rows)
    rows.append({"phase": "(unmarked)", "ms_per_step": step_us / 1e3 - marked,
                 "share": (step_us / 1e3 - marked) / (step_us / 1e3) if step_us else 0.0, "calls_per_step": 0.0,
                 "device_ms_per_step": 0.0})
    return rows, {"steps": len(steps), "step_ms": step_us / 1e3, "marked_ms": marked}


def format_phase_table(rows: list[dict], totals: dict, loop: str, device: bool) -> str:
    head = f"# {loop}: phases, {totals['steps']} steps of {totals['step_ms']:.2f} ms (CPU span per step)\n"
    cols = "| phase | ms/step | share | calls/step |" + (" device ms/step |" if device else "")
    lines = [head, cols, "|---|---|---|---|" + ("---|" if device else "")]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['ms_per_step']:.2f} | {r['share'] * 100:.1f}% | {r['calls_per_step']:g} |"
                     + (f" {r['device_ms_per_step']:.2f} |" if device else ""))
    return "\n".join(lines) + "\n"


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
        self._profs: dict[str, profile | None] = {"train": None, "val": None}  # the open window of each loop
        self._done = {"train": False, "val": False}
        self.tables: dict[str, list[dict]] = {}
        self.phases: dict[str, dict] = {}
        self._mark: dict[str, record_function | None] = {"train": None, "val": None}

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
        p_rows, totals = phase_rows(prof, phase)
        self.phases[phase] = {"rows": p_rows, **totals}
        phase_text = format_phase_table(p_rows, totals, phase, torch.cuda.is_available()) + "\n"
        (self.dir / f"{phase}_table.txt").write_text(phase_text + header + table + "\n")
        (self.dir / f"{phase}_phases.json").write_text(json.dumps(self.phases[phase], indent=2))
        prof.export_chrome_trace(str(self.dir / f"{phase}_trace.json"))
        self.tables[phase] = op_rows(prof, self._sort_key, self.row_limit)
        self._done[phase] = True
        log.info("profiler: wrote %s\n%s", self.dir / f"{phase}_table.txt", phase_text)
        rows = self.tables[phase]
        for logger in wandb_loggers(trainer):
            logger.log_table(key=f"profile/{phase}_phases", columns=list(p_rows[0]), data=[list(r.values()) for r in p_rows])
            logger.log_table(key=f"profile/{phase}_table", columns=list(rows[0]) if rows else ["name"],
                             data=[list(r.values()) for r in rows])

    # a run resumed from a checkpoint does not profile again a window whose tables it already wrote
    def state_dict(self) -> dict:
        return {"done": dict(self._done)}

    def load_state_dict(self, state: dict) -> None:
        self._done.update(state.get("done", {}))

    # ---- training window ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._profs["train"] is None and not self._done["train"] and trainer.global_step >= self.start_step:
            sched = schedule(wait=self.wait, warmup=self.warmup, active=self.active, repeat=1)
            self._profs["train"] = self._new(sched)
            self._profs["train"].__enter__()
            self._steps = 0
        if self._profs["train"] is not None:
            self._open("train")

    def _open(self, loop: str) -> None:
        self._mark[loop] = record_function(STEP_MARK.format(loop))
        self._mark[loop].__enter__()

    def _close(self, loop: str) -> None:
        if self._mark[loop] is not None:
            self._mark[loop].__exit__(None, None, None)
            self._mark[loop] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profs["train"] is None:
            return
        self._close("train")
        self._profs["train"].step()
        self._steps += 1
        if self._steps >= self.wait + self.warmup + self.active:
            self._finish("train", trainer)

    def _finish(self, loop: str, trainer) -> None:
        """Close ``loop``'s profiling window and write its tables."""
        self._close(loop)
        prof, self._profs[loop] = self._profs[loop], None
        prof.__exit__(None, None, None)
        self._write(prof, loop, trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profs["train"] is not None:  # the run ended inside the window: write what was recorded
            self._finish("train", trainer)

    # ---- validation -----------------------------------------------------------------------------
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.profile_val and not self._done["val"] and not trainer.sanity_checking and self._profs["val"] is None:
            self._profs["val"] = self._new()
            self._profs["val"].__enter__()
            self._val_seen = 0
        if self._profs["val"] is not None:
            self._open("val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._profs["val"] is None:
            return
        self._close("val")
        self._val_seen += 1
        if self._val_seen >= self.val_batches:
            self._finish("val", trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._profs["val"] is not None:
            self._finish("val", trainer)
