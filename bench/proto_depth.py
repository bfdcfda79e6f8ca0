"""Seed 002's claims on this machine, measured side by side in one run: the mesh transform (triple loop vs
vectorised; the seed: 5-10x, ~5.2 s to under 1 s per batch), the hybrid Chamfer loss (all pairs vs KNN; the
seed: 2-5x and less memory) and a whole training step (the seed: ~15 s to ~3-5 s per batch), at the seed's
sizes: 32 slots x 32 prototypes, level-4 ico-sphere (2562 vertices), 200 samples per slot, k_nearest 3.

Usage:
  python bench/proto_depth.py                    # batch 8 for the transform, 4 for the Chamfer and the step
  python bench/proto_depth.py --batch 4 --chamfer-batch 2 --target-points 4096
Writes bench/results/proto_depth_<cpu|gpu>.md.

Times are medians over --repeats calls after a warm-up call, forward and backward (the training cost).
Peak memory: on a GPU the peak allocated CUDA memory of the call; on a CPU the growth of the process's peak
resident memory (VmHWM, reset before each call) over its resident memory before the call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from _common import CUDA, device_name, emit, sync  # bench/_common.py

from src.process import peak_rss_mb, reset_peak_rss, rss_bytes
from src.geometry.knn import knn_points
from src.models.proto_depth import ProtoDepthModule
from src.models.proto_depth.losses import hybrid_chamfer
from src.geometry.mesh import icosphere
from src.models.proto_depth.network import transform_meshes, transform_meshes_looped

DEV = "cuda" if CUDA else "cpu"


def measure(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory MiB) of ``fn``, in a process that has run nothing else (see ``--only``):
    the peak is taken over the first (warm-up) call, against the memory in use before it."""
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    fn()
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else peak_rss_mb() - base / 2**20
    times = []
    for _ in range(repeats):
        sync()
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), peak


def transform_case(b: int, k: int, p: int, level: int, looped: bool) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    verts = torch.from_numpy(icosphere(level, prefer_pytorch3d=True)[0]).float()
    protos = (verts[None] + 0.02 * torch.randn(p, *verts.shape, generator=g)).to(DEV).requires_grad_()
    scale, euler, trans = (torch.rand(b, k, 3, generator=g).to(DEV).requires_grad_() for _ in range(3))
    fn = transform_meshes_looped if looped else transform_meshes

    def run() -> None:
        out = fn(protos, scale, euler, trans)
        out.sum().backward()

    return run


def chamfer_case(b: int, k: int, s: int, n: int, k_nearest: int, dense: bool) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(b, k, s, 3, generator=g).to(DEV).requires_grad_()
    target = torch.rand(b, n, 3, generator=g).to(DEV)
    trans = torch.rand(b, k, 3, generator=g).to(DEV).requires_grad_()

    def run() -> None:
        hybrid_chamfer(pred, target, trans, k_nearest, dense=dense)["loss"].backward()

    return run


def step_case(b: int, n: int, original: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model = ProtoDepthModule(looped_transform=original, dense_chamfer=original).to(DEV)  # the seed's sizes
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    depth = (2.5 + torch.rand(b, 1, 64, 64)).to(DEV)
    points = torch.randn(b, n, 3).to(DEV)
    batch = {"depth": depth, "points": points, "centre": points.mean(1), "radius": points.norm(dim=-1).amax(1)}

    def run() -> None:
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.log_dict = lambda *a, **k: None  # outside a Trainer
    return run


SLOTS, PROTOS, LEVEL, SAMPLES, K_NEAREST = 32, 32, 4, 200, 3  # the upstream Proto-Depth setup's sizes


def build(case: str, variant: str, a) -> Callable[[], None]:
    reference = variant == "reference"
    if case == "transform":
        return transform_case(a.batch, SLOTS, PROTOS, LEVEL, reference)
    if case == "chamfer":
        return chamfer_case(a.chamfer_batch, SLOTS, SAMPLES, a.target_points, K_NEAREST, reference)
    return step_case(a.chamfer_batch, a.target_points, reference)


def run_isolated(case: str, variant: str, a) -> tuple[float, float]:
    """One case in a fresh process, so freed memory of earlier cases does not hide this one's peak."""
    out = subprocess.run([sys.executable, __file__, "--only", f"{case}:{variant}", "--batch", str(a.batch),
                          "--chamfer-batch", str(a.chamfer_batch), "--target-points", str(a.target_points),
                          "--repeats", str(a.repeats)], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(case, variant, result, flush=True)
    return result["seconds"], result["peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="batch of the transform")
    p.add_argument("--chamfer-batch", type=int, default=4, help="batch of the Chamfer and the training step")
    p.add_argument("--target-points", type=int, default=8192, help="depth points per map")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # CASE:VARIANT, run by main itself
    a = p.parse_args()
    if a.only:
        seconds, peak = measure(build(*a.only.split(":"), a), a.repeats)
        print(json.dumps({"seconds": seconds, "peak_mib": peak}))
        return
    b, cb, n = a.batch, a.chamfer_batch, a.target_points
    cases = [("transform", f"mesh transform, fwd+bwd: {b} x {SLOTS} slots x {PROTOS} prototypes x 2562 vertices "
                           "(loop vs vectorised)", "5-10x (~5.2 s -> < 1 s per batch)"),
             ("chamfer", f"hybrid Chamfer, fwd+bwd: {cb} x {SLOTS * SAMPLES} predicted vs {n} depth points, "
                         f"k={K_NEAREST} (all pairs vs KNN, {'pytorch3d' if _has_p3d() else 'chunked torch'})",
              "2-5x, less memory"),
             ("step", f"training step (encoder, transform, sampling, loss, Adam): batch {cb}, 64x64 depth, {n} "
                      "points (loop + all pairs vs vectorised + KNN)", "~15 s -> ~3-5 s per batch")]
    rows = []
    for case, label, claim in cases:
        t_ref, m_ref = run_isolated(case, "reference", a)
        t_fast, m_fast = run_isolated(case, "optimised", a)
        ratio = f"{m_ref / m_fast:.1f}x" if m_fast >= 1 else "-"
        rows.append(f"| {label} | {claim} | {t_ref * 1e3:,.1f} ms / {m_ref:,.0f} MiB | {t_fast * 1e3:,.1f} ms / "
                    f"{m_fast:,.0f} MiB | {t_ref / t_fast:.1f}x | {ratio} |")
    gpu_note = "" if CUDA else " GPU columns: not measured (no GPU lent to this session)."
    lines = [f"Device: {device_name()}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`python bench/proto_depth.py{_args_text(a)}`", "",
             "| case | reference claim | reference: time / peak memory | optimised: time / peak memory | speed-up | "
             "memory ratio |", "|---|---|---|---|---|---|", *rows, "",
             f"Median of {a.repeats} calls after a warm-up, each case in its own process; peak memory is the "
             f"{'peak allocated CUDA memory' if CUDA else 'peak resident memory (VmHWM)'} of the warm-up call over "
             f"the memory in use before it.{gpu_note}"]
    emit("\n".join(lines), "proto_depth", a.out)


def _has_p3d() -> bool:
    try:
        knn_points(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), backend="pytorch3d")
    except ImportError:
        return False
    return True


def _args_text(a) -> str:
    defaults = {"batch": 8, "chamfer_batch": 4, "target_points": 8192, "repeats": 3, "out": None, "only": None}
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items() if defaults.get(k) != v)


if __name__ == "__main__":
    main()
