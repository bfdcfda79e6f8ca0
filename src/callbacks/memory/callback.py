"""The memory-growth callback: a series per loop, its Theil-Sen slope over a sliding window, and when growth is
sustained - or, in a loop's first ``window`` steps, unambiguous - two censuses ``census_gap`` steps apart with a
recording window between them (see the package)."""
from __future__ import annotations

import csv
import logging
import pickle
import statistics
import weakref
from pathlib import Path

import torch

from src.callbacks import SummaryCallback
from src.callbacks.memory.census import live_tensors, tensor_census
from src.callbacks.memory.provenance import CreationRecorder, snapshot_frames
from src.callbacks.memory.report import diagnose, format_report
from src.process import MB, heap_bytes, rss_bytes

log = logging.getLogger(__name__)
LOOPS = ("train", "val", "test")


class MemoryGrowthError(RuntimeError):
    """Raised by :class:`MemoryGrowth` with ``fail=True`` once a leak is named."""


def pair_slopes(ys: list[float]) -> list[float]:
    """(y_j - y_i) / (j - i) over all pairs i < j."""
    n = len(ys)
    return [(ys[j] - ys[i]) / (j - i) for i in range(n) for j in range(i + 1, n)]


def theil_sen_slope(ys: list[float]) -> float:
    """Median of the step-pair slopes: a per-step slope robust to isolated jumps."""
    slopes = pair_slopes(ys)
    return statistics.median(slopes) if slopes else 0.0


class _Series:
    def __init__(self, loop: str) -> None:
        self.loop = loop
        self.rows: list[dict] = []
        self.window_slopes: list[float] = []
        self.max_growth = 0.0
        self.sustained = 0
        self.census_at: tuple | None = None  # (step, tensors' weak references by id, census)
        self.leak: list[dict] | None = None
        self.steps = 0
        self.early: str | None = None  # why an early census was started (the loop's first steps grew unambiguously)
        self.early_dismissed = False  # an early census found too little to name: wait for the sustained rule


class MemoryGrowth(SummaryCallback):
    """Args:
        out_dir: where ``memory.csv``, ``memory_leak.txt`` and ``memory_snapshot.pickle`` go (the run dir).
        window: steps in the sliding window a loop's growth rate is fitted over.
        threshold_mb: growth per step (MiB) that, sustained, counts as a leak; default 0.1 on CUDA (allocated
            memory is exact) and 1.0 on CPU (malloc in-use bytes, or resident memory off glibc).
        census_gap: steps of the same loop between the two censuses (the recording window).
        early_steps: a loop's first steps after which growth is called from fewer than ``window`` steps when it is
            unambiguous: the Theil-Sen slope and at least ``early_agreement`` of all step-pair slopes above the
            threshold (a validation loop of one batch per validation run gets a step every validation run; the
            sustained rule alone would need ``2 * window`` of them). Such a census names a leak only when the tensors
            it finds grow by at least half the threshold; otherwise the sustained rule decides later.
        early_agreement: the share of step-pair slopes above the threshold the early rule asks for.
        fail: raise :class:`MemoryGrowthError` once a leak is named (after writing the report).
        every: record every N steps (the slope is per step regardless).
        loops: the loops to watch (``train``, ``val``, ``test``).
        record_stacks: record where tensors are made in the census window (:class:`CreationRecorder`, and the
            CUDA allocator's history on a GPU).
    """

    def __init__(self, out_dir: str, window: int = 50, threshold_mb: float | None = None, census_gap: int = 10,
                 fail: bool = False, every: int = 1, loops: tuple[str, ...] | list[str] = LOOPS,
                 record_stacks: bool = True, early_steps: int = 12, early_agreement: float = 0.9) -> None:
        bad = sorted(set(loops) - set(LOOPS))
        if bad:
            raise ValueError(f"memory_growth.loops: unknown loop(s) {bad}; choose from {list(LOOPS)}")
        self.out_dir, self.window, self.threshold_mb, self.census_gap = Path(out_dir), window, threshold_mb, census_gap
        self.fail, self.every, self.loops, self.record_stacks = fail, every, tuple(loops), record_stacks
        self.early_steps, self.early_agreement = early_steps, early_agreement
        self.series = {loop: _Series(loop) for loop in self.loops}
        self.threshold = 0.0  # bytes per step, set from threshold_mb or the device's default at the first step
        self._recorder: CreationRecorder | None = None
        self._recording_for: str | None = None
        self._cuda_history = False
        self.reports: dict[str, str] = {}

    # ---- compatibility views (the training loop's series) ---------------------------------------
    @property
    def rows(self) -> list[dict]:
        return [r for s in self.series.values() for r in s.rows]

    @property
    def leak(self) -> list[dict] | None:
        """The first loop's leak rows that was found (None: no leak found in any loop)."""
        return next((s.leak for s in self.series.values() if s.leak is not None), None)

    # ---- recording ------------------------------------------------------------------------------
    @staticmethod
    def _sample(device: torch.device) -> dict:
        if device.type == "cuda":
            row = {"allocated_mb": torch.cuda.memory_allocated(device) / MB,
                   "reserved_mb": torch.cuda.memory_reserved(device) / MB,
                   "peak_mb": torch.cuda.max_memory_allocated(device) / MB}
            torch.cuda.reset_peak_memory_stats(device)
        else:
            heap = heap_bytes()
            row = {"rss_mb": rss_bytes() / MB, **({} if heap is None else {"heap_mb": heap / MB})}
        return row

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step("train", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._step("val", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._step("test", pl_module)

    def _step(self, loop: str, pl_module) -> None:
        s = self.series.get(loop)
        if s is None:
            return
        s.steps += 1
        if s.steps % self.every:
            return
        row = {"loop": loop, "step": s.steps, **self._sample(pl_module.device)}
        key = "allocated_mb" if pl_module.device.type == "cuda" else "heap_mb" if "heap_mb" in row else "rss_mb"
        self.threshold = (self.threshold_mb if self.threshold_mb is not None
                          else 0.1 if pl_module.device.type == "cuda" else 1.0) * MB
        s.rows.append(row)
        recent = [r[key] * MB for r in s.rows[-self.window:]]
        growth = theil_sen_slope(recent) / self.every if len(recent) >= min(self.window, 10) else 0.0
        row["growth_mb_per_step"] = growth / MB
        if len(recent) >= self.window:
            s.max_growth = max(s.max_growth, growth)
            s.window_slopes.append(growth)
            s.sustained = s.sustained + 1 if growth > self.threshold else 0
        if loop == "train":
            pl_module.log("memory/growth_mb_per_step", growth / MB, on_step=True, on_epoch=False, batch_size=1)
            pl_module.log(f"memory/{key}", row[key], on_step=True, on_epoch=False, batch_size=1)
        early = self._unambiguous(s, recent) if s.leak is None and s.census_at is None else None
        if early is not None:
            self._census(s, early, key, pl_module.device)
        elif s.leak is None and (s.sustained >= max(1, self.window // self.every) or s.census_at is not None):
            self._census(s, growth, key, pl_module.device)

    def _unambiguous(self, s: _Series, ys: list[float]) -> float | None:
        """The early rule: within the loop's first ``window`` rows ``ys`` (at least ``early_steps``), nearly every
        pair of rows grew faster than the threshold. Returns the slope (bytes per step) and sets ``s.early`` (the
        basis, for the report) when it holds, else None."""
        n = len(ys)
        if s.early_dismissed or n < max(2, self.early_steps // self.every) or n >= self.window:
            return None
        slopes = [v / self.every for v in pair_slopes(ys)]
        share = sum(v > self.threshold for v in slopes) / len(slopes)
        slope = statistics.median(slopes)
        if share < self.early_agreement or slope <= self.threshold:
            return None
        s.early = (f"Theil-Sen slope over its first {n * self.every} steps, {share:.0%} of step pairs above "
                   f"{self.threshold / MB:g} MiB/step")
        return slope

    # ---- census and recording window ------------------------------------------------------------
    def _start_recording(self, loop: str, device: torch.device) -> None:
        if not self.record_stacks or self._recorder is not None:
            return
        if device.type == "cuda":
            try:
                torch.cuda.memory._record_memory_history(max_entries=200000)
                self._cuda_history = True
            except Exception as e:  # older drivers / builds without the history
                log.warning("memory: CUDA allocator history unavailable (%s)", e)
        self._recorder = CreationRecorder()
        self._recorder.__enter__()
        self._recording_for = loop

    def _stop_recording(self) -> dict:
        """Close the recording window (the recorder and, on CUDA, the allocator history); the snapshot or {}."""
        snapshot = {}
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = self._recording_for = None
        if self._cuda_history:
            snapshot = torch.cuda.memory._snapshot()
            with (self.out_dir / "memory_snapshot.pickle").open("wb") as f:
                pickle.dump(snapshot, f)
            torch.cuda.memory._record_memory_history(enabled=None)
            self._cuda_history = False
        return snapshot

    def _census(self, s: _Series, growth: float, key: str, device: torch.device) -> None:
        step = s.steps
        if s.census_at is None:
            tensors = live_tensors()
            s.census_at = (step, {id(t): weakref.ref(t) for t in tensors}, tensor_census(tensors))
            del tensors
            log.warning("memory grows %.2f MiB/step in the %s loop (%s); taking a tensor census at its steps %d and %d",
                        growth / MB, s.loop, s.early or f"over its last {self.window} steps", step,
                        step + self.census_gap)
            self._start_recording(s.loop, device)
            return
        first_step, first_refs, first = s.census_at
        if step - first_step < self.census_gap:
            return
        recorder = self._recorder if self._recording_for == s.loop else None
        snapshot = self._stop_recording() if recorder is not None else {}
        by_address = snapshot_frames(snapshot) if snapshot else {}

        def where(t: torch.Tensor):
            frames = recorder.where(t) if recorder is not None else None
            if frames is None and by_address and t.is_cuda:
                frames = by_address.get(t.untyped_storage().data_ptr())
            return frames

        tensors = live_tensors()
        report = diagnose(s.loop, first, first_refs, tensors, first_step, step, where, growth, key, self.window,
                          self.threshold)
        del tensors
        if s.early is not None:
            found = sum(r["bytes_per_iter"] + r.get("graph_bytes_per_iter", 0.0) for r in report.groups)
            if found < self.threshold / 2:  # warm-up, caches: nothing that names a leak; the sustained rule decides
                log.info("memory: the %s loop's early growth (%s) is not in live tensors (%.3f MiB/step found); "
                         "watching on", s.loop, s.early, found / MB)
                s.census_at, s.early, s.early_dismissed = None, None, True
                return
            report.basis = s.early
        if snapshot:
            report.snapshot_file = str(self.out_dir / "memory_snapshot.pickle")
        s.leak = report.groups
        text = format_report(report)
        self.reports[s.loop] = text
        (self.out_dir / "memory_leak.txt").write_text("\n".join(self.reports[lp] for lp in LOOPS if lp in self.reports))
        log.warning(text)
        if self.fail:
            raise MemoryGrowthError(f"memory grows {growth / MB:.3f} MiB/step in the {s.loop} loop; "
                                    f"see {self.out_dir / 'memory_leak.txt'}")

    # ---- a run resumed from a checkpoint continues each loop's series (memory.csv holds the whole run) --------
    _STATE = ("rows", "window_slopes", "max_growth", "sustained", "steps", "early_dismissed")

    def state_dict(self) -> dict:
        return {"series": {loop: {k: getattr(s, k) for k in self._STATE} for loop, s in self.series.items()},
                "reports": dict(self.reports), "leaks": {loop: s.leak for loop, s in self.series.items()}}

    def load_state_dict(self, state: dict) -> None:
        for loop, saved in state.get("series", {}).items():
            if loop in self.series:
                for k in self._STATE:
                    if k in saved:
                        setattr(self.series[loop], k, saved[k])
                self.series[loop].leak = state.get("leaks", {}).get(loop)
        self.reports.update(state.get("reports", {}))

    # ---- output ---------------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        self._write_csv()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write_csv()

    def on_test_end(self, trainer, pl_module) -> None:
        self._write_csv()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_recording()
        self._write_csv()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop_recording()  # a window still open when its stage ended: its census cannot finish

    def _write_csv(self) -> None:
        rows = self.rows
        if not rows:
            return
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "loop", k != "step", k))
        with (self.out_dir / "memory.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def summary(self) -> dict:
        """Flat metrics for metrics.json: each loop's steps, growth rate (the median window slope; None when the loop
        ran fewer steps than one ``window``) and whether a leak was found in it; ``memory/growth_mb_per_step`` is
        the training loop's, ``memory/leak_found`` any loop's."""
        out = {}
        for loop, s in self.series.items():
            if not s.rows:
                continue
            fitted = bool(s.window_slopes)  # None: the loop ran fewer steps than one window, no rate to give
            out.update({f"memory/{loop}/steps": s.steps,
                        f"memory/{loop}/growth_mb_per_step":
                            round(statistics.median(s.window_slopes) / MB, 4) if fitted else None,
                        f"memory/{loop}/max_window_growth_mb_per_step": round(s.max_growth / MB, 4) if fitted else None,
                        f"memory/{loop}/leak_found": s.leak is not None})
        out["memory/growth_mb_per_step"] = out.get("memory/train/growth_mb_per_step")
        out["memory/max_window_growth_mb_per_step"] = out.get("memory/train/max_window_growth_mb_per_step")
        out["memory/leak_found"] = self.leak is not None
        return out
