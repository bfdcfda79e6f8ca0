"""Kernel A/B: on the first real training batch, every fast op against its torch reference.

The kernels' arguments are captured during one real training step (``kernels.capture``); afterwards each
op is replayed on copies of them under ``torch`` and under the fast backend (Triton: on CUDA tensors, or
on CPU under ``TRITON_INTERPRET=1``), timed, and compared: max abs error of the outputs (and of the state
an in-place op changes), and of the input gradients where the op has a backward. The table goes to
``<out_dir>/kernel_ab.txt``, the log, and W&B when it is the logger; errors above ``tol`` warn, or raise
with ``fail``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import torch

from src import kernels
from src.loggers import wandb_loggers

log = logging.getLogger(__name__)
DIFFERENTIABLE = {"raw2alpha", "alpha_to_weights", "segment_sum", "distortion_loss"}
IN_PLACE = {"total_variation_add_grad": (1,), "grid_adam_step": (0, 2, 3)}  # op -> indices of changed args


class KernelMismatchError(RuntimeError):
    pass


def _tensors(x) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in _tensors(x[k])]
    if isinstance(x, (tuple, list)):
        return [v for item in x for v in _tensors(item)]
    return []


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    errs = [float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel() and x.is_floating_point()]
    errs += [float((x != y).sum()) for x, y in zip(a, b) if x.numel() and not x.is_floating_point()]
    return max(errs, default=0.0)


def _fresh(args: tuple) -> tuple:
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args)


def replay(op: str, args: tuple, backend: str, reps: int = 3) -> dict:
    """Run ``op`` under ``backend``: outputs, changed state, input gradients, median seconds."""
    fn = getattr(kernels, op)
    times = []
    with kernels.use_backend(backend):
        for _ in range(reps + 1):  # the first call warms up (Triton compiles)
            call_args = _fresh(args)
            if any(torch.is_tensor(a) and a.is_cuda for a in call_args):
                torch.cuda.synchronize()
            tic = time.perf_counter()
            with torch.set_grad_enabled(op in DIFFERENTIABLE):
                out = fn(*call_args)
            if any(torch.is_tensor(a) and a.is_cuda for a in call_args):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tic)
        result = {"out": [t.detach() for t in _tensors(out)], "seconds": sorted(times[1:])[len(times[1:]) // 2]}
        result["state"] = [call_args[i].detach() for i in IN_PLACE.get(op, ())]
        grads = []
        if op in DIFFERENTIABLE:
            leaves = [a for a in call_args if torch.is_tensor(a) and a.requires_grad]
            outs = [t for t in _tensors(out) if t.requires_grad]
            if leaves and outs:
                gen = torch.Generator(device=outs[0].device).manual_seed(0)
                loss = sum((o * torch.rand(o.shape, generator=gen, device=o.device, dtype=o.dtype)).sum() for o in outs)
                grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
                grads = [g for g in grads if g is not None]
        result["grads"] = grads
    return result


def fast_backend_for(args: tuple) -> tuple[str | None, str]:
    """The backend to compare with torch, or None and why not."""
    if not kernels.triton_available():
        return None, "triton not installed"
    t = next(a for a in args if torch.is_tensor(a))
    if t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton", ""
    return None, "CPU tensors (set TRITON_INTERPRET=1 to check the Triton kernels on CPU)"


class KernelAB(L.Callback):
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
                row.update(fast_ms=res["seconds"] * 1e3, speedup=ref["seconds"] / max(res["seconds"], 1e-12),
                           max_abs_err=_max_err(res["out"] + res["state"], ref["out"] + ref["state"]),
                           max_abs_grad_err=_max_err(res["grads"], ref["grads"]) if op in DIFFERENTIABLE else None)
            self.rows.append(row)
        text = self.table(active, used)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "kernel_ab.txt").write_text(text + "\n")
        log.info("kernel A/B on step %d:\n%s", self.step, text)
        cols = ["op", "backend", "torch_ms", "fast_ms", "speedup", "max_abs_err", "max_abs_grad_err"]
        for logger in wandb_loggers(trainer) if trainer is not None else []:
            logger.log_table(key="kernel_ab", columns=cols, data=[[r.get(c) for c in cols] for r in self.rows])
        bad = [r["op"] for r in self.rows
               if max(r.get("max_abs_err") or 0.0, r.get("max_abs_grad_err") or 0.0) > self.tol]
        if bad:
            msg = f"kernel A/B: {bad} differ from the torch reference by more than {self.tol} (see kernel_ab.txt)"
            if self.fail:
                raise KernelMismatchError(msg)
            log.warning(msg)
        return self.rows

    def table(self, active: dict, used: dict) -> str:
        lines = [f"kernel A/B on training step {self.step} (real arguments), backend setting: "
                 + ", ".join(f"{op}={used.get(op, active[op])}" for op in sorted({r['op'] for r in self.rows})), "",
                 "| op | fast backend | torch ms | fast ms | speed-up | max abs err | max abs grad err |",
                 "|---|---|---|---|---|---|---|"]

        def f(v, spec):
            return "" if v is None else format(v, spec)

        for r in self.rows:
            lines.append(f"| {r['op']} | {r['backend']} | {r['torch_ms']:.3f} | {f(r.get('fast_ms'), '.3f')} | "
                         f"{f(r.get('speedup'), '.2f')} | {f(r.get('max_abs_err'), '.2e')} | "
                         f"{f(r.get('max_abs_grad_err'), '.2e')} |")
        return "\n".join(lines)

    def summary(self) -> dict:
        errs = [max(r.get("max_abs_err") or 0.0, r.get("max_abs_grad_err") or 0.0) for r in self.rows if "fast_ms" in r]
        return {"kernel_ab/max_abs_err": max(errs)} if errs else {}
