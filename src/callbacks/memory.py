"""Memory growth per training step, and a census that names what grew.

Each step records CUDA allocated / peak memory (on a GPU) or the process's resident memory (on a CPU) to
``memory.csv``. Growth per iteration is a Theil-Sen slope (median of pairwise slopes) over a sliding
window, so one-off jumps - a grid that doubles at a progressive-scaling step, a new optimizer - do not
read as a leak while a steady per-step increase does. Growth counts as found when that slope stays above
``threshold_mb`` for ``window`` consecutive steps (the CPU's resident memory also moves with the
allocator's caching; a leak keeps growing). Then the callback takes a census of live tensors (by shape,
dtype, device) at that step and again ``census_gap`` steps later, and writes what grew to
``memory_leak.txt``: count and bytes per iteration for each (shape, dtype, device). It then warns, or
raises :class:`MemoryGrowthError` if ``fail``. The run's growth rate reported in ``metrics.json`` is the
median of the window slopes.

The census sees tensors reachable from Python (module attributes, lists, dicts, closures); tensors kept
alive only inside an autograd graph are reported through the graph's roots that Python still holds.
"""
from __future__ import annotations

import csv
import gc
import logging
import statistics
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)
MB = 2**20


class MemoryGrowthError(RuntimeError):
    pass


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    kb = _proc_status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB since start or :func:`reset_peak_rss` (NaN off Linux)."""
    kb = _proc_status_kb("VmHWM")
    return float("nan") if kb is None else kb / 1024


def reset_peak_rss() -> None:
    """Reset the peak resident memory (VmHWM) to the current one (Linux; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def theil_sen_slope(ys: list[float]) -> float:
    """Median of (y_j - y_i) / (j - i) over all pairs i < j: a per-step slope robust to isolated jumps."""
    n = len(ys)
    slopes = [(ys[j] - ys[i]) / (j - i) for i in range(n) for j in range(i + 1, n)]
    return statistics.median(slopes) if slopes else 0.0


def tensor_census() -> Counter:
    """Live tensors reachable from Python, counted by (shape, dtype, device); parameters and their
    gradients included. Returns Counter[(shape, dtype, device)] -> count, with bytes per tensor in a side map."""
    census: Counter = Counter()
    seen: set[int] = set()
    with warnings.catch_warnings():  # isinstance() on some library objects warns about deprecations
        warnings.simplefilter("ignore")
        tensors = []
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    tensors.append(obj)
            except ReferenceError:  # dead weak proxies
                continue
    for obj in tensors:
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        census[(tuple(obj.shape), str(obj.dtype).replace("torch.", ""), str(obj.device))] += 1
    return census


def element_size(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def census_diff(before: Counter, after: Counter, steps: int) -> list[dict]:
    """What grew between two censuses ``steps`` apart, largest first: count and bytes per iteration."""
    rows = []
    for key in set(after) | set(before):
        delta = after[key] - before[key]
        if delta <= 0:
            continue
        shape, dtype, device = key
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * element_size(dtype)
        rows.append({"shape": shape, "dtype": dtype, "device": device, "count": delta,
                     "count_per_iter": delta / steps, "bytes_per_iter": delta * nbytes / steps})
    return sorted(rows, key=lambda r: -r["bytes_per_iter"])


class MemoryGrowth(L.Callback):
    """Args:
        out_dir: where ``memory.csv`` and ``memory_leak.txt`` go (the run dir).
        window: steps in the sliding window the growth rate is fitted over.
        threshold_mb: growth per step (MiB) that, sustained, counts as a leak; default 0.1 on CUDA (allocated
            memory is exact) and 1.0 on CPU (resident memory includes allocator caching).
        census_gap: steps between the two censuses.
        fail: raise :class:`MemoryGrowthError` once the leak is named (after writing the report).
        every: record every N steps (the slope is per step regardless).
    """

    def __init__(self, out_dir: str, window: int = 50, threshold_mb: float | None = None, census_gap: int = 10,
                 fail: bool = False, every: int = 1) -> None:
        self.out_dir, self.window, self.threshold_mb, self.census_gap = Path(out_dir), window, threshold_mb, census_gap
        self.fail, self.every = fail, every
        self.rows: list[dict] = []
        self.census_at: tuple[int, Counter] | None = None
        self.leak: list[dict] | None = None
        self.max_growth = 0.0
        self.window_slopes: list[float] = []
        self._sustained = 0

    # ---- recording ------------------------------------------------------------------------------
    def _sample(self, step: int, device: torch.device) -> dict:
        if device.type == "cuda":
            row = {"step": step, "allocated_mb": torch.cuda.memory_allocated(device) / MB,
                   "peak_mb": torch.cuda.max_memory_allocated(device) / MB}
            torch.cuda.reset_peak_memory_stats(device)
        else:
            row = {"step": step, "rss_mb": rss_bytes() / MB}
        return row

    @property
    def _key(self) -> str:
        return "allocated_mb" if self.rows and "allocated_mb" in self.rows[0] else "rss_mb"

    def on_train_start(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows = []
        default = 0.1 if pl_module.device.type == "cuda" else 1.0
        self.threshold = (self.threshold_mb if self.threshold_mb is not None else default) * MB

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        self.rows.append(self._sample(step, pl_module.device))
        recent = [r[self._key] * MB for r in self.rows[-self.window:]]
        growth = theil_sen_slope(recent) / self.every if len(recent) >= min(self.window, 10) else 0.0
        self.rows[-1]["growth_mb_per_step"] = growth / MB
        if len(recent) >= self.window:
            self.max_growth = max(self.max_growth, growth)
            self.window_slopes.append(growth)
            self._sustained = self._sustained + 1 if growth > self.threshold else 0
        pl_module.log("memory/growth_mb_per_step", growth / MB, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(f"memory/{self._key}", self.rows[-1][self._key], on_step=True, on_epoch=False, batch_size=1)
        if self.leak is None and (self._sustained >= self.window // self.every or self.census_at is not None):
            self._census(step, growth)

    def _census(self, step: int, growth: float) -> None:
        if self.census_at is None:
            self.census_at = (step, tensor_census())
            log.warning("memory grows %.2f MiB/step over the last %d steps; taking a tensor census at steps %d and %d",
                        growth / MB, self.window, step, step + self.census_gap)
            return
        first_step, first = self.census_at
        if step - first_step < self.census_gap:
            return
        self.leak = census_diff(first, tensor_census(), step - first_step)
        lines = [f"memory grows {growth / MB:.3f} MiB/step ({self._key}, Theil-Sen slope over {self.window} steps, "
                 f"above {self.threshold / MB:g} MiB/step for {self.window} steps)",
                 f"live tensors that grew between steps {first_step} and {step}:"]
        for r in self.leak[:20]:
            lines.append(f"  +{r['count_per_iter']:g}/iter  {r['count']} x {r['shape']} {r['dtype']} {r['device']}"
                         f"  = {r['bytes_per_iter'] / MB:.3f} MiB/iter")
        if not self.leak:
            lines.append("  (none reachable from Python: the growth is in allocator caches or C++-held memory)")
        (self.out_dir / "memory_leak.txt").write_text("\n".join(lines) + "\n")
        log.warning("\n".join(lines))
        if self.fail:
            raise MemoryGrowthError(f"memory grows {growth / MB:.3f} MiB/step; see {self.out_dir / 'memory_leak.txt'}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write_csv()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._write_csv()

    def _write_csv(self) -> None:
        if not self.rows:
            return
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        with (self.out_dir / "memory.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def summary(self) -> dict:
        """Flat metrics for metrics.json."""
        growth = statistics.median(self.window_slopes) if self.window_slopes else 0.0
        return {"memory/growth_mb_per_step": round(growth / MB, 4),
                "memory/max_window_growth_mb_per_step": round(self.max_growth / MB, 4),
                "memory/leak_found": self.leak is not None}
