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

The package, by part: ``callback`` (:class:`MemoryGrowth`), ``census`` (live tensors by shape, dtype, device),
``graphs`` (what autograd graphs keep alive), ``provenance`` (where tensors are made), ``report``
(:func:`diagnose` -> :class:`LeakReport`, :func:`format_report`); the process's memory readings are in
:mod:`src.process`.
"""
from src.callbacks.memory.callback import LOOPS, MemoryGrowth, MemoryGrowthError, theil_sen_slope
from src.callbacks.memory.census import census_diff, live_tensors, tensor_census
from src.callbacks.memory.report import LeakReport, diagnose, format_report

__all__ = ["LOOPS", "MemoryGrowth", "MemoryGrowthError", "theil_sen_slope", "census_diff", "live_tensors",
           "tensor_census", "LeakReport", "diagnose", "format_report"]
