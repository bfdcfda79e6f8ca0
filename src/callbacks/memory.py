"""Memory growth per step in every loop (training, validation, test), and a report that names what grew, how
much memory it holds (through autograd graphs too) and the source lines that made it.

Each step of each loop records CUDA allocated / reserved / peak memory (on a GPU) or, on a CPU, the process's
resident memory and malloc's in-use bytes (:func:`heap_bytes`, glibc; the growth signal there: resident memory
stays flat while a leak refills memory freed earlier) to ``memory.csv``, one series per loop (column ``loop``; ``step`` counts that loop's steps
over the whole run). Growth per step is a Theil-Sen slope (median of pairwise slopes) over a sliding window
of each series, so one-off jumps - a grid that doubles at a progressive-scaling step, a new optimizer, a
validation pass between two training steps - do not read as a leak while a steady per-step increase does.
Growth counts as found in a loop when its slope stays above ``threshold_mb`` for ``window`` consecutive steps
of that loop, so a validation leak is found even when the training loop is clean.

Then the callback takes a census of live tensors (by shape, dtype, device) at that step and again
``census_gap`` steps of the same loop later, and between the two records where tensors are made: a
:class:`CreationRecorder` (a ``TorchDispatchMode``) keeps the Python stack of each op's outputs, keyed by
storage, and on CUDA the allocator's own history runs too (``torch.cuda.memory._record_memory_history``; its
snapshot is written to ``memory_snapshot.pickle``, which https://pytorch.org/memory_viz opens). Nothing is
recorded outside that window. The report, ``memory_leak.txt``:

- for each (shape, dtype, device) group whose count grew: count and bytes per step;
- when the new tensors of a group hold autograd graphs (a loss kept with its graph), the tensors those graphs
  keep alive (each node's saved tensors, parameters excluded), by shape and dtype with their bytes per step:
  ``+1/step () float32 holding a graph of 96 x (8, 3, 256) float32 = 2.25 MiB/step``;
- where each was made: file:line and function, innermost frames of project or user code first (frames in
  torch, Lightning and the standard library are skipped).

It then warns, or raises :class:`MemoryGrowthError` if ``fail``. ``metrics.json`` gets each loop's growth
rate (the median of its window slopes) and whether a leak was found in it.

The census sees tensors reachable from Python (module attributes, lists, dicts, closures) and the graphs they
hold; memory held only by C++ (allocator caches, a graph whose Python roots are gone) is growth without a
named tensor, and the report says so.
"""
from __future__ import annotations

import csv
import ctypes
import gc
import logging
import os
import pickle
import statistics
import sys
import warnings
import weakref
from collections import Counter, defaultdict
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)
MB = 2**20
LOOPS = ("train", "val", "test")


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (glibc's ``mallinfo2``: in-use heap chunks plus mmapped
    blocks; where torch's CPU tensors live), or None off glibc. Unlike resident memory it does not stay flat
    while a leak reuses memory freed earlier, nor move with the allocator's caching."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return m.uordblks + m.hblkhd


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


def _key(t: torch.Tensor) -> tuple:
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
    return Counter(_key(t) for t in (live_tensors() if tensors is None else tensors))


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


# ---- autograd graphs ------------------------------------------------------------------------------------
def _storage_id(t: torch.Tensor) -> tuple:
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
                    saved.setdefault(_storage_id(t), t)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return saved


# ---- where tensors are made -----------------------------------------------------------------------------
_SKIP = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, L, os, warnings) if getattr(m, "__file__", None))
try:
    import lightning_utilities  # Lightning's helpers
    _SKIP += (os.path.dirname(lightning_utilities.__file__) + os.sep,)
except ImportError:  # pragma: no cover
    pass


def user_frames(frames: list[tuple[str, int, str]], limit: int = 3) -> list[tuple[str, int, str]]:
    """The innermost ``limit`` frames of ``frames`` (innermost first) outside torch, Lightning, the standard
    library and this module: the project's or the user's code."""
    def ours(path: str) -> bool:
        return not (path.startswith(_SKIP) or path == __file__ or path.startswith("<") or "site-packages" in path
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
                    self.stacks.setdefault(_storage_id(t), frames)
                else:
                    self.stacks[_storage_id(t)] = frames
        return out

    def where(self, t: torch.Tensor) -> list[tuple[str, int, str]] | None:
        frames = self.stacks.get(_storage_id(t))
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


def _where_counts(tensors: list[torch.Tensor], where) -> Counter:
    return Counter(tuple(user_frames(f)) for f in (where(t) for t in tensors) if f is not None)


# ---- one loop's series ----------------------------------------------------------------------------------
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


class MemoryGrowth(L.Callback):
    """Args:
        out_dir: where ``memory.csv``, ``memory_leak.txt`` and ``memory_snapshot.pickle`` go (the run dir).
        window: steps in the sliding window a loop's growth rate is fitted over.
        threshold_mb: growth per step (MiB) that, sustained, counts as a leak; default 0.1 on CUDA (allocated
            memory is exact) and 1.0 on CPU (malloc in-use bytes, or resident memory off glibc).
        census_gap: steps of the same loop between the two censuses (the recording window).
        fail: raise :class:`MemoryGrowthError` once a leak is named (after writing the report).
        every: record every N steps (the slope is per step regardless).
        loops: the loops to watch (``train``, ``val``, ``test``).
        record_stacks: record where tensors are made in the census window (:class:`CreationRecorder`, and the
            CUDA allocator's history on a GPU).
    """

    def __init__(self, out_dir: str, window: int = 50, threshold_mb: float | None = None, census_gap: int = 10,
                 fail: bool = False, every: int = 1, loops: tuple[str, ...] | list[str] = LOOPS,
                 record_stacks: bool = True) -> None:
        bad = sorted(set(loops) - set(LOOPS))
        if bad:
            raise ValueError(f"memory_growth.loops: unknown loop(s) {bad}; choose from {list(LOOPS)}")
        self.out_dir, self.window, self.threshold_mb, self.census_gap = Path(out_dir), window, threshold_mb, census_gap
        self.fail, self.every, self.loops, self.record_stacks = fail, every, tuple(loops), record_stacks
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
        if s.leak is None and (s.sustained >= max(1, self.window // self.every) or s.census_at is not None):
            self._census(s, growth, key, pl_module.device)

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
            log.warning("memory grows %.2f MiB/step in the %s loop over its last %d steps; taking a tensor census "
                        "at its steps %d and %d", growth / MB, s.loop, self.window, step, step + self.census_gap)
            self._start_recording(s.loop, device)
            return
        first_step, first_refs, first = s.census_at
        if step - first_step < self.census_gap:
            return
        tensors = live_tensors()
        steps = step - first_step
        s.leak = census_diff(first, tensor_census(tensors), steps)
        recorder = self._recorder if self._recording_for == s.loop else None
        snapshot = self._stop_recording() if recorder is not None else {}
        by_address = snapshot_frames(snapshot) if snapshot else {}

        def where(t: torch.Tensor):
            frames = recorder.where(t) if recorder is not None else None
            if frames is None and by_address and t.is_cuda:
                frames = by_address.get(t.untyped_storage().data_ptr())
            return frames

        new = defaultdict(list)  # group -> tensors made since the first census
        grown = {(r["shape"], r["dtype"], r["device"]) for r in s.leak}
        for t in tensors:
            k = _key(t)
            if k in grown:
                ref = first_refs.get(id(t))
                if ref is None or ref() is not t:
                    new[k].append(t)
        lines = [f"memory grows {growth / MB:.3f} MiB/step in the {s.loop} loop ({key}, Theil-Sen slope over {self.window} "
                 f"steps, above {self.threshold / MB:g} MiB/step for {self.window} steps)",
                 f"live tensors that grew between {s.loop} steps {first_step} and {step}:"]
        graphs = {}
        for r in s.leak:  # the memory each group's new tensors keep alive through their autograd graphs
            made = new.get((r["shape"], r["dtype"], r["device"]), [])
            graphs[id(r)] = graph = graph_groups([t for t in made if t.grad_fn is not None], steps)
            if graph:
                r["graph"] = [{k: v for k, v in g.items() if k != "tensors"} for g in graph]
                r["graph_bytes_per_iter"] = sum(g["bytes_per_iter"] for g in graph)
        s.leak.sort(key=lambda r: -(r["bytes_per_iter"] + r.get("graph_bytes_per_iter", 0.0)))
        held_by = {}  # storage -> the group whose graphs keep it alive (the largest such group)
        for r in reversed(s.leak):
            for g in graphs[id(r)]:
                for t in g["tensors"]:
                    held_by[_storage_id(t)] = r
        for r in s.leak[:20]:
            made, graph = new.get((r["shape"], r["dtype"], r["device"]), []), graphs[id(r)]
            line = (f"  +{r['count_per_iter']:g}/step  {r['count']} x {r['shape']} {r['dtype']} {r['device']}"
                    f"  = {r['bytes_per_iter'] / MB:.3f} MiB/step")
            if graph:
                parts = ", ".join(f"{g['count_per_iter']:g} x {g['shape']} {g['dtype']}" for g in graph[:4])
                more = f" and {len(graph) - 4} more shapes" if len(graph) > 4 else ""
                line += f", holding a graph of {parts}{more} = {r['graph_bytes_per_iter'] / MB:.3f} MiB/step"
            owners = Counter(id(held_by[k]) for k in map(_storage_id, made) if k in held_by and held_by[k] is not r)
            if owners:
                owner = next(o for o in s.leak if id(o) == owners.most_common(1)[0][0])
                r["held_by_graph_of"] = (owner["shape"], owner["dtype"])
                line += (f" - {sum(owners.values())} of them saved in the graph of the {owner['shape']} {owner['dtype']} "
                         "group (the same memory)")
            lines.append(line)
            lines += self._made_at("made at", made, where, 2)
            for g in graph[:3]:
                lines += self._made_at(f"its graph's {g['shape']} {g['dtype']} made at", g["tensors"], where, 1)
            r["made_at"] = [format_frames(list(fr)) for fr, _ in _where_counts(made, where).most_common(2)]
        del graphs, held_by
        if not s.leak:
            lines.append("  (none reachable from Python: the growth is in allocator caches or C++-held memory)")
        if snapshot:
            lines.append(f"CUDA allocator history of those steps: {self.out_dir / 'memory_snapshot.pickle'} "
                         "(open in https://pytorch.org/memory_viz)")
        del tensors, new
        text = "\n".join(lines) + "\n"
        self.reports[s.loop] = text
        (self.out_dir / "memory_leak.txt").write_text("\n".join(self.reports[lp] for lp in LOOPS if lp in self.reports))
        log.warning(text)
        if self.fail:
            raise MemoryGrowthError(f"memory grows {growth / MB:.3f} MiB/step in the {s.loop} loop; "
                                    f"see {self.out_dir / 'memory_leak.txt'}")

    @staticmethod
    def _made_at(label: str, tensors: list[torch.Tensor], where, top: int) -> list[str]:
        counts = _where_counts(tensors, where)
        return [f"      {label} {format_frames(list(fr))}  ({n} of {len(tensors)})" for fr, n in counts.most_common(top)]

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
