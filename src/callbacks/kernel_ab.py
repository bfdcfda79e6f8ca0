"""Kernel A/B: on the first real training batch, every fast op against its torch reference.

The kernels' arguments are captured during one real training step (``kernels.capture``); afterwards each
op is replayed on copies of them under ``torch`` and under the fast backend (Triton: on CUDA tensors, or
on CPU under ``TRITON_INTERPRET=1``), timed, and compared: max abs error of the outputs (and of the state
an in-place op changes), and of the input gradients where the op has a backward; ops whose result is a
set of samples are matched sample by sample (:mod:`src.kernels.parity`: a GPU may place a few boundary
samples differently, counted in the table). The table goes to ``<out_dir>/kernel_ab.txt``, the log, and
W&B when it is the logger; an op outside the parity tolerance, or with errors above ``tol``, warns, or
raises with ``fail``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from src import kernels
from src.callbacks import SummaryCallback
from src.kernels import parity
from src.loggers import wandb_loggers

log = logging.getLogger(__name__)


class KernelMismatchError(RuntimeError):
    pass


def replay(op: str, args: tuple, backend: str, reps: int = 3) -> dict:
    """Run ``op`` under ``backend`` (:func:`src.kernels.parity.run`): outputs, changed state, input
    gradients, and the median seconds of ``reps`` timed calls after a warm-up (Triton compiles there)."""
    fn = getattr(kernels, op)
    cuda = any(torch.is_tensor(a) and a.is_cuda for a in args)
    times = []
    with kernels.use_backend(backend):
        for _ in range(reps + 1):
            if cuda:
                torch.cuda.synchronize()
            tic = time.perf_counter()
            result = parity.run(fn, op, args)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tic)
    result["seconds"] = sorted(times[1:])[len(times[1:]) // 2]
    return result


def fast_backend_for(args: tuple) -> tuple[str | None, str]:
    """The backend to compare with torch, or None and why not."""
    if not kernels.triton_available():
        return None, "triton not installed"
    t = next(a for a in args if torch.is_tensor(a))
    if t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton", ""
    return None, "CPU tensors (set TRITON_INTERPRET=1 to check the Triton kernels on CPU)"


class KernelAB(SummaryCallback):
    """Args: out_dir (run dir); step: the training step whose kernel calls are replayed; tol: max abs error
    allowed (values and gradients); fail: raise :class:`KernelMismatchError` above ``tol``; reps: timed runs."""

    def __init__(self, out_dir: str, step: int = 0, tol: float = 1e-4, fail: bool = False, reps: int = 3) -> None:
        self.out_dir, self.step, self.tol, self.fail, self.reps = Path(out_dir), step, tol, fail, reps
        self._ctx = None
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self._ctx is None and not self.rows:
            self._ctx = kernels.capture()
            self._captured = self._ctx.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._ctx is None:
            return
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        self.compare(dict(self._captured), trainer)

    def compare(self, captured: dict[str, tuple], trainer=None) -> list[dict]:
        active = kernels.active_backends()
        used = kernels.used_backends()
        for op, args in captured.items():
            ref = replay(op, args, "torch", self.reps)
            fast, why = fast_backend_for(args)
            row = {"op": op, "torch_ms": ref["seconds"] * 1e3, "backend": fast or f"n/a: {why}"}
            if fast:
                res = replay(op, args, fast, self.reps)
                verdict = parity.compare(op, res, ref)
                row.update(fast_ms=res["seconds"] * 1e3, speedup=ref["seconds"] / max(res["seconds"], 1e-12),
                           max_abs_err=verdict.max_abs_err, max_abs_grad_err=verdict.max_abs_grad_err,
                           n_differ=verdict.n_differ, parity=verdict.reason or "ok")
            self.rows.append(row)
        text = self.table(active, used)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "kernel_ab.txt").write_text(text + "\n")
        log.info("kernel A/B on step %d:\n%s", self.step, text)
        cols = ["op", "backend", "torch_ms", "fast_ms", "speedup", "max_abs_err", "max_abs_grad_err", "n_differ", "parity"]
        for logger in wandb_loggers(trainer) if trainer is not None else []:
            logger.log_table(key="kernel_ab", columns=cols, data=[[r.get(c) for c in cols] for r in self.rows])
        bad = [r["op"] for r in self.rows if r.get("parity", "ok") != "ok"
               or max(r.get("max_abs_err") or 0.0, r.get("max_abs_grad_err") or 0.0) > self.tol]
        if bad:
            msg = (f"kernel A/B: {bad} differ from the torch reference (parity tolerance, or abs error above "
                   f"{self.tol}; see kernel_ab.txt)")
            if self.fail:
                raise KernelMismatchError(msg)
            log.warning(msg)
        return self.rows

    def table(self, active: dict, used: dict) -> str:
        lines = [f"kernel A/B on training step {self.step} (real arguments), backend setting: "
                 + ", ".join(f"{op}={used.get(op, active[op])}" for op in sorted({r['op'] for r in self.rows})), "",
                 "| op | fast backend | torch ms | fast ms | speed-up | max abs err | max abs grad err | "
                 "boundary cases differing | parity |",
                 "|---|---|---|---|---|---|---|---|---|"]

        def f(v, spec):
            return "" if v is None else format(v, spec)

        for r in self.rows:
            lines.append(f"| {r['op']} | {r['backend']} | {r['torch_ms']:.3f} | {f(r.get('fast_ms'), '.3f')} | "
                         f"{f(r.get('speedup'), '.2f')} | {f(r.get('max_abs_err'), '.2e')} | "
                         f"{f(r.get('max_abs_grad_err'), '.2e')} | {f(r.get('n_differ'), 'd')} | {r.get('parity', '')} |")
        return "\n".join(lines)

    def summary(self) -> dict:
        errs = [max(r.get("max_abs_err") or 0.0, r.get("max_abs_grad_err") or 0.0) for r in self.rows if "fast_ms" in r]
        return {"kernel_ab/max_abs_err": max(errs)} if errs else {}
