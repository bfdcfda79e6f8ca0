"""Named phases of a method's step, for the profiler callback's phase table (``src/callbacks/profiler.py``).

Each method wraps the parts of its algorithm in :func:`phase` (names as in its paper: DVGO's ``sample``,
``density``, ``composite``, ``colour``, ``loss``; PU-INN's ``flow.forward``, ``interpolate``, ``flow.inverse``,
``logdet``; ...), and :class:`PhaseHooks` marks Lightning's ``backward`` and ``optimizer`` (step and zero_grad)
for methods with automatic optimisation. A phase is a ``torch.profiler.record_function`` range while a
profiler is recording, and a bare ``nullcontext`` otherwise: nothing is recorded or timed when the profiler
is off. Phases may nest (the optimizer step runs the training-step closure); the table counts each phase's
time outside the phases nested in it.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.autograd.profiler import record_function

_OFF = nullcontext()
NAMES: set[str] = set()  # every phase name entered while a profiler recorded (the phase table's rows)


def phase(name: str):
    """A ``record_function(name)`` range while the profiler records, else a no-op context."""
    if not torch.autograd._profiler_enabled():
        return _OFF
    NAMES.add(name)
    return record_function(name)


class PhaseHooks:
    """LightningModule mixin (put it before ``L.LightningModule``): automatic optimisation's ``backward`` and
    ``optimizer`` (the step, exclusive of the closure it runs, and zero_grad) as phases."""

    def backward(self, loss, *args, **kwargs):
        with phase("backward"):
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, *args, **kwargs):
        with phase("optimizer"):
            super().optimizer_step(*args, **kwargs)

    def optimizer_zero_grad(self, *args, **kwargs):
        with phase("optimizer"):
            super().optimizer_zero_grad(*args, **kwargs)
