"""Stopping on a signal. ``SIGTERM`` (what a cluster sends before it kills a job) and ``SIGINT`` (Ctrl+C) set a
flag; the training loop (``src.callbacks.stop.StopOnSignal``) and every long loop outside it (data loading, scene
generation, DVGO's per-voxel view count, patch and mesh caching) check it with :func:`check`, so a run ends within
seconds at a point where its state is whole, writes ``last.ckpt`` if it took a step, and says how to resume.
Under SLURM, ``SIGUSR1`` (``sbatch --signal=USR1@90``) and ``SIGUSR2`` (what submitit sends, ``signal_delay_s``
before the time limit) also requeue the job once the checkpoint is written; the requeued job resumes from it.
A second Ctrl+C stops at once."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
from typing import Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Stopped(BaseException):
    """Raised where a run notices the stop flag. A ``BaseException``, like ``KeyboardInterrupt``: code that turns
    ``Exception`` into a clear error about a bad file must not turn a stop into one."""

    def __init__(self, signum: int, where: str) -> None:
        self.signum, self.where = int(signum), where
        self.message = ""  # what the pipeline printed (checkpoint, resume command)
        super().__init__(f"stopped by {signal.Signals(self.signum).name} during {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal (SIGTERM: 143)


_state: dict = {"signum": None, "requeue": False}


def on_slurm() -> bool:
    """A SLURM batch job (as Lightning's ``SLURMEnvironment`` decides: not an interactive ``srun --pty bash``)."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _on_signal(signum: int, frame) -> None:
    if _state["signum"] is not None and signum == signal.SIGINT:  # a second Ctrl+C: stop now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    if signum in REQUEUE_SIGNALS:
        _state["requeue"] = True
    if _state["signum"] is None:
        _state["signum"] = signal.SIGTERM if signum in REQUEUE_SIGNALS else signum
        what = "checkpointing and requeueing" if _state["requeue"] else "stopping"
        log.warning("received %s: %s at the next safe point (seconds)%s", signal.Signals(signum).name, what,
                    "; press Ctrl+C again to stop at once" if signum == signal.SIGINT else "")


@contextlib.contextmanager
def handling_signals() -> Iterator[None]:
    """For the block (a run, an evaluation): route the stop signals (and under SLURM the requeue signals) to the
    flag, starting clear; the handlers before it come back afterwards. Main thread only (Python delivers signals
    there); elsewhere the block runs with the handlers as they are."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = STOP_SIGNALS + (REQUEUE_SIGNALS if on_slurm() else ())
    before = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def reset() -> None:
    _state.update(signum=None, requeue=False)


def requested() -> int | None:
    """The signal that asked this run to stop, or None."""
    return _state["signum"]


def requeue_requested() -> bool:
    return bool(_state["requeue"]) and on_slurm()


def check(where: str) -> None:
    """Raise :class:`Stopped` if a stop was asked for; ``where`` names the loop for the message (e.g. "DVGO's
    per-voxel view count (view 3 of 100)")."""
    if _state["signum"] is not None:
        raise Stopped(_state["signum"], where)


def requeue_job() -> str:
    """``scontrol requeue`` this SLURM job; returns what happened, for the log."""
    job = slurm_job_id()
    if not job or not re.fullmatch(r"[0-9_]+", job):
        return f"not requeued: no usable SLURM job id ({job!r})"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"requeueing SLURM job {job} failed: {e}"
    if proc.returncode != 0:
        return f"requeueing SLURM job {job} failed (scontrol exit {proc.returncode}: {proc.stderr.strip()[:200]})"
    return f"requeued SLURM job {job}: it resumes from this checkpoint when it starts again"
