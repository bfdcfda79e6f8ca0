"""Callbacks any method switches on from the command line (``conf/callbacks``): ``profiler.ProfilerTable``,
``memory.MemoryGrowth``, ``kernel_ab.KernelAB``, ``throughput.Throughput``, ``mesh.MeshExport``; and
``sweep.SweepSummary``, a Hydra callback that tabulates a multirun."""
from __future__ import annotations

import lightning as L


class SummaryCallback(L.Callback):
    """A callback whose figures go into the run's ``metrics.json`` (flat keys) when the run ends."""

    def summary(self) -> dict:
        raise NotImplementedError
