"""Callbacks any method switches on from the command line (``conf/callbacks``): ``profiler.ProfilerTable``,
``memory.MemoryGrowth``, ``kernel_ab.KernelAB``, ``throughput.Throughput``; and ``sweep.SweepSummary``, a
Hydra callback that tabulates a multirun."""
