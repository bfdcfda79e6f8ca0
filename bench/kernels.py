"""Custom kernels, measured side by side: per-op torch vs triton, the O(N) distortion loss's table, and the
end-to-end DVGO table in the form of DVGO's speed-up table (PSNR and mm:ss; torch vs triton).

Usage:
  python bench/kernels.py                       # all three sections; CPU: torch columns at small sizes
  python bench/kernels.py --sections ops,dist   # a subset (ops | dist | e2e)
  python bench/kernels.py --lego PATH           # GPU: end-to-end on full-resolution lego (160^3 and 256^3)
Writes the tables to bench/results/kernels_<device>.md (override with --out).

Timing: median wall time of repeated calls after a warm-up (CUDA synchronised), forward + backward where
the op has one. Peak memory: CUDA's max_memory_allocated above the inputs; on CPU, the distortion table
runs each case in a fresh process, resets its peak RSS once the inputs exist (/proc/self/clear_refs), and
reports how far the peak (VmHWM) rose above that.
The Triton column is filled only on a GPU: the CPU interpreter checks kernels, it is not a speed path.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import CUDA, ROOT, device_name, emit, sync  # bench/_common.py

from src import kernels
from src.process import peak_rss_mb, reset_peak_rss, rss_bytes
from src.kernels import reference

DEV = "cuda" if CUDA else "cpu"


def measure(fn, min_time=1.0, max_reps=50):
    """Median seconds per call, and peak CUDA MB above what was allocated before (None on CPU)."""
    fn()  # warm-up (Triton compiles here)
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else None
    return statistics.median(times), peak


def ragged_batch(n_rays, mean_n, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * mean_n + 1, (n_rays,), generator=g)
    ray_id = torch.repeat_interleave(torch.arange(n_rays), counts).to(DEV)
    M = ray_id.numel()
    return ray_id, torch.rand(M, generator=g).to(DEV), torch.rand(M, C, generator=g).to(DEV)


def op_cases(scale):
    """(name, size text, callable(backend) -> a function running the op once, fwd + bwd where it has one)."""
    n_rays, mean_n = 8192 // scale, 128
    ray_id, alpha, rgb = ragged_batch(n_rays, mean_n)
    s = torch.sort(torch.rand_like(alpha) + ray_id.float() * 2).values - ray_id.float() * 2
    M = alpha.numel()
    grid_side = 160 // max(1, scale // 2)
    k0 = torch.randn(1, 12, grid_side, grid_side, grid_side, device=DEV)
    g = torch.randn_like(k0)
    g[torch.rand_like(g) < 0.5] = 0
    per_lr = torch.rand(1, 1, *k0.shape[2:], device=DEV)
    o = (torch.rand(n_rays, 3, device=DEV) - 0.5) * 8
    d = torch.randn(n_rays, 3, device=DEV)
    lo, hi = -torch.ones(3, device=DEV), torch.ones(3, device=DEV)
    raw = torch.randn(M, device=DEV) * 5

    def with_grad(fn, *xs):
        def run():
            leaves = [x.detach().requires_grad_(True) for x in xs]
            out = fn(*leaves)
            out = out if torch.is_tensor(out) else out[0]
            out.sum().backward()
        return run

    m_state, v_state = torch.zeros_like(k0), torch.zeros_like(k0)
    return [
        ("raw2alpha", f"{M:,} samples",
         lambda: with_grad(lambda x: kernels.raw2alpha(x, -4.0, 0.5), raw)),
        ("alpha_to_weights", f"{n_rays:,} rays x ~{mean_n} samples",
         lambda: with_grad(lambda a: kernels.alpha_to_weights(a * 0.1, ray_id, n_rays)[0], alpha)),
        ("segment_sum", f"{M:,} x 3 -> {n_rays:,} rays",
         lambda: with_grad(lambda v: kernels.segment_sum(v, ray_id, n_rays), rgb)),
        ("distortion_loss", f"{n_rays:,} rays x ~{mean_n} samples",
         lambda: with_grad(lambda w: kernels.distortion_loss(w * 0.01, s, 0.01, ray_id, n_rays), alpha)),
        ("ray_aabb", f"{n_rays:,} rays", lambda: (lambda: kernels.ray_aabb(o, d, lo, hi, 0.1, 1e9))),
        ("sample_pts_on_rays", f"{n_rays:,} rays, step 0.02",
         lambda: (lambda: kernels.sample_pts_on_rays(o, d, lo, hi, 0.1, 1e9, 0.02))),
        ("total_variation_add_grad", f"grid 12x{grid_side}^3",
         lambda: (lambda: kernels.total_variation_add_grad(k0, g.clone(), 1e-4, 1e-4, 1e-4, False))),
        ("grid_adam_step", f"grid 12x{grid_side}^3, per-voxel lr, skip zero grad",
         lambda: (lambda: kernels.grid_adam_step(k0.clone(), g, m_state, v_state, 0.9, 0.99, 1e-8, 0.1, True, per_lr))),
    ]


def ops_table(scale):
    rows = ["| op | size | torch ms | triton ms | speed-up | torch peak MB | triton peak MB |",
            "|---|---|---|---|---|---|---|"]
    for name, size, make in op_cases(scale):
        res = {}
        for backend in ("torch", "triton"):
            if backend == "triton" and not (CUDA and kernels.triton_available()):
                continue
            with kernels.use_backend(backend):
                res[backend] = measure(make())
        t_ms = f"{res['torch'][0] * 1e3:.2f}"
        if "triton" in res:
            tr = res["triton"]
            rows.append(f"| {name} | {size} | {t_ms} | {tr[0] * 1e3:.2f} | {res['torch'][0] / tr[0]:.1f}x "
                        f"| {res['torch'][1]:.0f} | {tr[1]:.0f} |")
        else:
            rows.append(f"| {name} | {size} | {t_ms} | n/a (no GPU) | | n/a (CPU) | |")
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------ the O(N) distortion loss table
DIST_IMPLS = ("original_distloss (O(N^2))", "eff_distloss (package, dense B x N)",
              "flatten_eff_distloss (package, flat + ray_id)", "ours, torch (flat + ray_id)",
              "ours, triton (flat + ray_id)")


def _dist_runner(impl: str, N: int, B: int, ragged: bool):
    """The inputs of one distortion case and a function running ``impl`` on them once (fwd + bwd).

    ``ragged``: ray i has n_i ~ U[N/2, 3N/2] samples (as DVGO's rays through a box); the dense package then
    runs on the zero-padded (B, max n_i) layout a user would build, the flat ones on the n_i samples."""
    from torch_efficient_distloss import eff_distloss, flatten_eff_distloss

    g = torch.Generator().manual_seed(0)
    counts = torch.randint(N // 2, N + N // 2 + 1, (B,), generator=g) if ragged else torch.full((B,), N)
    width = int(counts.max())
    valid = torch.arange(width)[None] < counts[:, None]  # (B, width)
    w = torch.rand(B, width, generator=g) * valid
    w = (w / w.sum(-1, keepdim=True)).to(DEV)
    m = ((torch.arange(width) + 0.5)[None] / counts[:, None]).to(DEV)  # normalised midpoints per ray
    ray_id = torch.arange(B).repeat_interleave(counts).to(DEV)
    valid = valid.to(DEV)
    wf, mf = w[valid], m[valid]
    N = width if ragged else N

    def run():
        x = (w if impl.startswith(("original", "eff")) else wf).detach().requires_grad_(True)
        if impl.startswith("original"):
            loss = reference.distortion_loss_quadratic(x, m, 1 / N)
        elif impl.startswith("eff"):
            loss = eff_distloss(x, m, 1 / N)
        elif impl.startswith("flatten"):  # builds a CUDA extension on first use (needs CUDA tensors and nvcc)
            loss = flatten_eff_distloss(x, mf, 1 / N, ray_id)
        else:
            with kernels.use_backend("triton" if "triton" in impl else "torch"):
                loss = kernels.distortion_loss(x, mf, 1 / N, ray_id, B)
        loss.backward()

    return run


def dist_case(impl: str, N: int, B: int = 8192, reps: int | None = None, ragged: bool = False) -> dict:
    """One distortion case (fwd + bwd): time and peak memory; run in its own process on CPU for a clean
    peak RSS."""
    run = _dist_runner(impl, N, B, ragged)
    if not CUDA:  # reset this process's peak RSS (VmHWM) to its current RSS, after the inputs exist
        reset_peak_rss()
        base_rss = rss_bytes() / 2**20
    reps = reps or (5 if impl.startswith("original") else 21)
    t, peak = measure(run, min_time=0.5, max_reps=reps)
    if peak is None:
        peak = peak_rss_mb() - base_rss
    return {"time_ms": t * 1e3, "peak_mb": peak}


def dist_times_interleaved(impls: list[str], N: int, B: int = 8192, ragged: bool = False, rounds: int = 25) -> dict:
    """CPU timing of the O(N) implementations side by side: one process, the calls interleaved round by
    round (A B A B ...), so the allocator's state and page faults, which move a single case's time by 2-5x
    between fresh processes on this machine, weigh on every implementation alike. Median ms per impl."""
    runs = {impl: _dist_runner(impl, N, B, ragged) for impl in impls}
    for run in runs.values():
        run()  # warm-up
    times = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl, run in runs.items():
            tic = time.perf_counter()
            run()
            times[impl].append(time.perf_counter() - tic)
    return {impl: statistics.median(t) * 1e3 for impl, t in times.items()}


def dist_table(Ns, mem_cap_gb, ragged=False):
    results = {}
    for impl in DIST_IMPLS:
        if ("triton" in impl and not (CUDA and kernels.triton_available())) or (ragged and impl.startswith("original")):
            continue
        for N in Ns:
            need_gb = 3 * 8192 * N * N * 4 / 2**30 if impl.startswith("original") else 0  # ~3 live (B,N,N) fp32
            if need_gb > mem_cap_gb:
                results[impl, N] = f"skipped (~{need_gb:.0f} GB)"
                continue
            if CUDA:
                try:
                    r = dist_case(impl, N, ragged=ragged)
                except torch.OutOfMemoryError:
                    results[impl, N] = "OOM"
                    torch.cuda.empty_cache()
                    continue
                except Exception as e:  # noqa: BLE001 - e.g. the package's extension does not build here
                    results[impl, N] = f"failed ({type(e).__name__})"
                    print(impl, N, "failed:", str(e)[-500:], flush=True)
                    continue
            else:
                if impl.startswith("flatten"):
                    results[impl, N] = "n/a (CUDA extension)"
                    continue
                out = subprocess.run([sys.executable, __file__, "--_dist_case", impl, str(N), str(int(ragged))],
                                     capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    results[impl, N] = "failed"
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl, N] = r
            print(impl, N, r, flush=True)
    if not CUDA:  # times side by side in one process per N (peak memory stays per fresh process)
        for N in Ns:
            out = subprocess.run([sys.executable, __file__, "--_dist_times", str(N), str(int(ragged))],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            for impl, ms in json.loads(out.stdout.strip().splitlines()[-1]).items():
                if isinstance(results.get((impl, N)), dict):
                    results[impl, N]["time_ms"] = ms
            print("interleaved", N, out.stdout.strip().splitlines()[-1], flush=True)
    head = "| # of pts `N` | " + " | ".join(str(n) for n in Ns) + " |"
    sep = "|---|" + "---|" * len(Ns)
    mem = [head, sep]
    tim = [head, sep]
    for impl in DIST_IMPLS:
        cells = [results.get((impl, N)) for N in Ns]
        if ragged and impl.startswith("original"):
            continue
        if all(c is None for c in cells):
            mem.append(f"| {impl} | " + " | ".join("n/a (no GPU)" for _ in Ns) + " |")
            tim.append(mem[-1])
            continue
        mem.append(f"| {impl} | " + " | ".join(c if isinstance(c, str) else f"{c['peak_mb']:.0f}" for c in cells) + " |")
        tim.append(f"| {impl} | " + " | ".join(c if isinstance(c, str) else f"{c['time_ms']:.1f}" for c in cells) + " |")
    where = "peak GPU memory above the inputs" if CUDA else "peak RSS above the inputs, fresh process per case"
    how = "median" if CUDA else ("median; the O(N) rows timed side by side in one process per N, calls "
                                 "interleaved (25 rounds), the O(N^2) row in its own process")
    return [f"Peak memory (MB, {where}), B = 8192 rays, forward + backward:", "", *mem, "",
            f"Time per forward + backward (ms, {how}):", "", *tim]


# ------------------------------------------------------------------ end-to-end DVGO table
def e2e_table(lego: str | None):
    rows = ["| backend | " + " | ".join(f"{c} PSNR | {c} `mm:ss`" for c in ("160^3", "256^3")) + " |",
            "|---|---|---|---|---|"]
    if CUDA and lego:
        sizes = {"160^3": ["model.fine.num_voxels=4096000"],
                 "256^3": ["model.fine.num_voxels=16777216", "model.fine.pg_scale=[1000,2000,3000,4000,5000,6000]"]}
        base = ["experiment=dvgo_lego", f"data.root={lego}", "trainer=gpu"]
        backends = ("torch", "triton")
    else:  # CPU: the torch path on the generated scene at two small fine grids
        sizes = {"160^3": ["experiment=dvgo_smoke"], "256^3": ["experiment=dvgo_smoke", "model.fine.num_voxels=262144"]}
        rows[0] = "| backend | smoke 48^3 PSNR | smoke 48^3 `mm:ss` | smoke 64^3 PSNR | smoke 64^3 `mm:ss` |"
        base, backends = [], ("torch",)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            for label, over in sizes.items():
                run_dir = Path(tmp) / f"{backend}_{label[:3]}"
                tic = time.perf_counter()
                subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
                                f"kernels={backend}", *base, *over], cwd=ROOT, check=True)
                wall = time.perf_counter() - tic
                psnr = json.loads((run_dir / "metrics.json").read_text())["test/psnr"]
                results[backend, label] = f"{psnr:.2f} | `{int(wall // 60):02d}:{int(wall % 60):02d}`"
                print(backend, label, results[backend, label], flush=True)
    for backend in ("torch", "triton"):
        cells = [results.get((backend, label), "n/a (no GPU) | ") for label in sizes]
        rows.append(f"| {backend} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="ops,dist,e2e")
    parser.add_argument("--lego", default=None, help="full-resolution lego for the GPU end-to-end table")
    parser.add_argument("--dist-n", default="32,64,128,256,384,512")
    parser.add_argument("--mem-cap-gb", type=float, default=12.0, help="skip O(N^2) cases needing more")
    parser.add_argument("--out", default=None)
    parser.add_argument("--_dist_case", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_dist_times", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._dist_times:
        impls = [i for i in DIST_IMPLS if i.startswith(("eff", "ours, torch"))]
        print(json.dumps(dist_times_interleaved(impls, int(args._dist_times[0]), ragged=args._dist_times[1] == "1")))
        return
    if args._dist_case:
        impl = args._dist_case[0]
        # on a CPU the O(N) rows' times come from dist_times_interleaved: here only their peak memory counts
        reps = None if CUDA or impl.startswith("original") else 3
        print(json.dumps(dist_case(impl, int(args._dist_case[1]), reps=reps, ragged=args._dist_case[2] == "1")))
        return
    device = device_name()
    sections = args.sections.split(",")
    lines = [f"Device: {device}; torch {torch.__version__}; {platform.machine()}; measured "
             f"{time.strftime('%Y-%m-%d %H:%M')} by `python bench/kernels.py --sections {args.sections}`", ""]
    if "ops" in sections:
        scale = 1 if CUDA else 4
        lines += ["## Per op (forward + backward where the op has one)", "", *ops_table(scale), ""]
    if "dist" in sections:
        lines += ["## Distortion loss (O(N) against the O(N^2) reference)", "",
                  *dist_table([int(n) for n in args.dist_n.split(",")], args.mem_cap_gb), "",
                  "### Ragged rays (ray i has N/2 to 3N/2 samples; the dense package on the zero-padded layout)", "",
                  *dist_table([int(n) for n in args.dist_n.split(",")], args.mem_cap_gb, ragged=True), ""]
    if "e2e" in sections:
        lines += ["## DVGO end to end (PSNR and mm:ss)", "", *e2e_table(args.lego), ""]
    emit("\n".join(lines), "kernels", args.out)

if __name__ == "__main__":
    main()
