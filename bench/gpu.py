"""The GPU figures in one command: kernel parity on CUDA tensors at real sizes, per-op torch vs Triton
timings, DVGO on lego torch vs Triton (PSNR and mm:ss), the O(N) distortion loss's table, NeRF and NeuS
training it/s and render s/image (beside the reference GPU figures), memory growth per method, and PU-INN's CPU preset trained for a
fixed time on the GPU (steps/s, CD on the PU-GAN test pairs).

Usage:
  python bench/gpu.py [--lego PATH]     # on one GPU; ~8 minutes; writes bench/results/gpu.md
  python bench/gpu.py --tiny            # the same code at toy sizes on any machine (Triton under its
                                        # interpreter on a CPU: a check that the script runs, not a speed)
Options: --sections parity,ops,dvgo,dist,render,memory,pu_inn; --pu-meshes / --pu-tests (default
.gpu-data/pu_train_meshes and .gpu-data/pu_gan/test); --pu-minutes (PU-INN's training time); --budget-s (sections that would start past it
are skipped, and the table says so); --dvgo-schedule fifth|full; --data-dir (generated scenes).

Every section that cannot run says why in the output (no GPU, no lego, over budget).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--tiny" in sys.argv:  # Triton's interpreter must be chosen before triton is imported (CPU only)
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from _common import CUDA, ROOT, device_name, emit, steps_per_second, sync  # noqa: E402  (bench/_common.py)

import kernels as kernels_bench  # noqa: E402  (bench/kernels.py)
from src import kernels  # noqa: E402
from src.kernels import parity  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
SECTIONS = ("parity", "ops", "dvgo", "dist", "render", "memory", "pu_inn")
# (it/s, s/img) quoted for the upstream implementations on a GPU
SEED_004 = {"NeRF": (4.0, 21.0), "NeuS": (5.0, 60.0)}


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    return 1.0 / steps_per_second(fn, reps)


# ------------------------------------------------------------------------------- op arguments
def op_args(tiny: bool) -> dict[str, tuple[str, tuple]]:
    """Real-sized arguments per op (8192 rays, 160^3 grids; toy sizes with ``tiny``): op -> (size, args)."""
    g = torch.Generator().manual_seed(0)
    n_rays, side, mean_n = (64, 8, 12) if tiny else (8192, 160, 128)
    counts = torch.randint(0, 2 * mean_n + 1, (n_rays,), generator=g)
    ray_id = torch.repeat_interleave(torch.arange(n_rays), counts)
    M = ray_id.numel()
    alpha = torch.rand(M, generator=g) * 0.2
    s = (torch.arange(M) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts) + 0.5).float() / (2 * mean_n)
    grid = torch.randn(1, 12, side, side, side, generator=g)
    grad = torch.randn(grid.shape, generator=g) * (torch.rand(grid.shape, generator=g) < 0.5)
    o = (torch.rand(n_rays, 3, generator=g) - 0.5) * 8
    d = torch.randn(n_rays, 3, generator=g)
    lo, hi = -torch.ones(3), torch.ones(3)
    dev = lambda *xs: tuple(x.to(DEV) if torch.is_tensor(x) else x for x in xs)  # noqa: E731
    step = 2 / side * 0.5  # DVGO's half-voxel step
    rays = f"{n_rays:,} rays x ~{mean_n}"
    return {
        "raw2alpha": (f"{M:,} samples", dev(torch.randn(M, generator=g) * 5, -4.6, 0.5)),
        "alpha_to_weights": (f"{rays}, stop_T 1e-3", dev(alpha, ray_id, n_rays, 1e-3)),
        "segment_sum": (f"{M:,} x 3 -> {n_rays:,}", dev(torch.rand(M, 3, generator=g), ray_id, n_rays)),
        "distortion_loss": (rays, dev(alpha * 0.05, s, 1 / (2 * mean_n), ray_id, n_rays)),
        "ray_aabb": (f"{n_rays:,} rays", dev(o, d, lo, hi, 0.1, 1e9)),
        "sample_pts_on_rays": (f"{n_rays:,} rays, half-voxel step", dev(o, d, lo, hi, 0.1, 1e9, step)),
        "total_variation_add_grad": (f"12 x {side}^3", dev(grid, grad, 1e-3, 1e-3, 1e-3, False)),
        "grid_adam_step": (f"12 x {side}^3, per-voxel lr, masked",
                           dev(grid, grad, torch.zeros_like(grid), torch.zeros_like(grid), 0.9, 0.99, 1e-8, 0.1, True,
                               torch.rand(1, 1, side, side, side, generator=g))),
    }


def parity_section(tiny: bool) -> list[str]:
    rows = ["| op | size | parity | max abs err | max abs grad err | boundary cases differing |", "|---|---|---|---|---|---|"]
    for op, (size, args) in op_args(tiny).items():
        with kernels.use_backend("torch"):
            ref = parity.run(getattr(kernels, op), op, args)
        try:
            with kernels.use_backend("triton"):
                fast = parity.run(getattr(kernels, op), op, args)
            v = parity.compare(op, fast, ref)
            grad = "" if v.max_abs_grad_err is None else f"{v.max_abs_grad_err:.2e}"
            rows.append(f"| {op} | {size} | {'ok' if v.ok else 'FAIL: ' + v.reason} | {v.max_abs_err:.2e} | {grad} | {v.n_differ} |")
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile or crashes is a table row
            rows.append(f"| {op} | {size} | FAIL: {type(e).__name__}: {str(e).splitlines()[-1][:200] if str(e) else ''} | | | |")
        print(rows[-1], flush=True)
    return rows


def op_call(op: str, args: tuple):
    """One call of ``op`` on ``args`` as training makes it: forward, and backward through its floating
    tensor inputs where the op has one (in-place ops update the same tensors call after call)."""
    fn = getattr(kernels, op)
    if op not in parity.DIFFERENTIABLE:
        return lambda: fn(*args)
    leaves = tuple(a.detach().clone().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point() else a
                   for a in args)

    def call():
        out = fn(*leaves)
        sum(t.sum() for t in parity.tensors(out) if t.requires_grad).backward()

    return call


def ops_section(tiny: bool) -> list[str]:
    rows = ["| op | size | torch ms | triton ms | speed-up |", "|---|---|---|---|---|"]
    reps = 2 if tiny else 20
    for op, (size, args) in op_args(tiny).items():
        res = {}
        for backend in ("torch", "triton"):
            with kernels.use_backend(backend):
                res[backend] = timed(op_call(op, args), reps)
        rows.append(f"| {op} | {size} | {res['torch'] * 1e3:.2f} | {res['triton'] * 1e3:.2f} | "
                    f"{res['torch'] / res['triton']:.2f}x |")
        print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- DVGO end to end
def train_run(overrides: list[str], tmp: str, name: str) -> tuple[dict, float]:
    run_dir = Path(tmp) / name
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
                           *overrides], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        raise RuntimeError(f"train.py {' '.join(overrides)} failed: {' | '.join(lines[-3:])}")
    return json.loads((run_dir / "metrics.json").read_text()), wall


def mmss(seconds: float) -> str:
    return f"`{int(seconds // 60):02d}:{int(seconds % 60):02d}`"


def dvgo_section(tiny: bool, lego: str | None, schedule: str, data_dir: str | None, tmp: str) -> list[str]:
    if tiny:
        label, over = "generated scene, toy schedule", [
            "experiment=dvgo_smoke", "model.coarse.iters=3", "model.fine.iters=3", "model.coarse.alpha_init=0.05",
            "model.fine.pg_scale=[2]", "model.n_rand=256", "trainer.val_check_interval=1000", "callbacks.mesh=null",
            "data.test_stride=3"]  # keep in step with `stride` below
    elif lego:
        label = "lego 160^3, " + ("published schedule (5k + 20k)" if schedule == "full" else
                                  "1/5 of the published iterations (1k + 4k, pg_scale 250/500/750/1000)")
        over = ["experiment=dvgo_lego", f"data.root={lego}", "trainer=gpu", "data.test_stride=8",
                "model.fine.num_voxels=4096000"]
        if schedule != "full":
            over += ["model.coarse.iters=1000", "model.fine.iters=4000", "model.fine.pg_scale=[250,500,750,1000]"]
    else:
        return ["skipped: no lego scene (pass --lego PATH to nerf_synthetic/lego)"]
    over += [f"paths.data_dir={data_dir}"] if data_dir else []
    stride = 3 if tiny else 8
    rows = [f"DVGO ({label}); PSNR on every {stride}th view of the tested split (val when there is no test split)", "",
            "| backend | PSNR | `mm:ss` (all in) | train s | speed-up | kernels used |", "|---|---|---|---|---|---|"]
    base = None
    for backend in ("torch", "triton"):
        m, wall = train_run([*over, f"kernels={backend}"], tmp, f"dvgo_{backend}")
        base = base or m["time/train_s"]
        used = sorted({v for k, v in m.items() if k.startswith("kernels/") and "not called" not in v})
        rows.append(f"| {backend} | {m['test/psnr']:.2f} | {mmss(wall)} | {m['time/train_s']:.1f} | "
                    f"{base / m['time/train_s']:.2f}x | {', '.join(used)} |")
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------- distortion loss
def dist_section(tiny: bool) -> list[str]:
    Ns, B = ((8, 16), 128) if tiny else ((32, 64, 128, 256, 384, 512), 8192)
    impls = list(kernels_bench.DIST_IMPLS)
    cells = {}
    for impl in impls:
        for N in Ns:
            if impl.startswith("original") and 3 * B * N * N * 4 > 24 * 2**30:
                cells[impl, N] = "skipped (memory)"
                continue
            if impl.startswith("flatten") and not CUDA:
                cells[impl, N] = "n/a (CUDA extension)"
                continue
            try:
                r = kernels_bench.dist_case(impl, N, B=B, reps=2 if tiny else 5)
                cells[impl, N] = f"{r['time_ms']:.1f} ms / {r['peak_mb']:.0f} MB"
            except Exception as e:  # noqa: BLE001 - e.g. the package's CUDA extension does not build
                cells[impl, N] = f"failed ({type(e).__name__})"
                if CUDA:
                    torch.cuda.empty_cache()
    rows = [f"B = {B} rays, forward + backward: median time / peak memory above the inputs", "",
            "| # of pts `N` | " + " | ".join(str(n) for n in Ns) + " |", "|---|" + "---|" * len(Ns)]
    rows += [f"| {impl} | " + " | ".join(cells[impl, N] for N in Ns) + " |" for impl in impls]
    return rows


# ---------------------------------------------------------------------------- NeRF / NeuS speed
def _camera_rays(h: int, w: int, origin: float, fov: float):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=DEV), torch.linspace(-1, 1, w, device=DEV), indexing="ij")
    rays_d = torch.stack([xs * fov, ys * fov, -torch.ones_like(xs)], -1)
    return torch.zeros_like(rays_d) + torch.tensor([0.0, 0.0, origin], device=DEV), rays_d


def render_section(tiny: bool) -> list[str]:
    from src.models.nerf import NeRFModule
    from src.models.neus import NeuSModule

    if tiny:
        nerf = NeRFModule(n_samples=8, n_importance=8, netdepth=2, netwidth=32, netdepth_fine=2, netwidth_fine=32)
        neus = NeuSModule(n_samples=8, n_importance=8, up_sample_steps=1, sdf={"d_out": 17, "d_hidden": 16, "n_layers": 2,
                                                                            "skip_in": []},
                          rendering={"d_feature": 16, "d_hidden": 16, "n_layers": 1})
        sizes, steps = {"NeRF": (16, 16), "NeuS": (12, 16)}, 2
    else:
        nerf, neus = NeRFModule(), NeuSModule()  # published sizes
        sizes, steps = {"NeRF": (800, 800), "NeuS": (600, 800)}, 20
    rows = ["| method | training it/s (reference) | ours it/s | render s/img (reference) | ours s/img | image |",
            "|---|---|---|---|---|---|"]
    for name, model in (("NeRF", nerf), ("NeuS", neus)):
        torch.manual_seed(0)
        model = model.to(DEV)
        n = 64 if tiny else (1024 if name == "NeRF" else 512)
        g = torch.Generator().manual_seed(0)
        rays_o = torch.tensor([0.0, 0.0, 4.0 if name == "NeRF" else 2.5]).expand(n, 3).contiguous().to(DEV)
        rays_d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g) * 0.15 - torch.tensor([0.0, 0.0, 1.0]), dim=-1).to(DEV)
        target = torch.rand(n, 3, device=DEV)
        if name == "NeRF":
            model.set_scene(2.0, 6.0, 1.0)
        opt = torch.optim.Adam(model.parameters(), lr=5e-4)

        def step():
            if name == "NeRF":
                out = model.render_rays(rays_o, rays_d)
                loss = ((out["rgb"] - target) ** 2).mean() + ((out["coarse_rgb"] - target) ** 2).mean()
            else:
                out, eikonal = model._render(rays_o, rays_d)
                loss = (out["rgb"] - target).abs().mean() + 0.1 * eikonal
            opt.zero_grad()
            loss.backward()
            opt.step()

        model.train()
        it_s = 1 / timed(step, steps)
        h, w = sizes[name]
        ro, rd = _camera_rays(h, w, 4.0 if name == "NeRF" else 2.5, 0.4 if name == "NeRF" else 0.3)
        model.eval()
        sync()
        tic = time.perf_counter()
        model.render_image(ro, rd)
        sync()
        s_img = time.perf_counter() - tic
        seed_it, seed_s = SEED_004[name]
        rows.append(f"| {name} | {seed_it:g} | {it_s:.2f} | {seed_s:g} | {s_img:.2f} | {w}x{h} |")
        print(rows[-1], flush=True)
    return rows


# -------------------------------------------------------------------------------- memory growth
def memory_section(tiny: bool, data_dir: str | None, tmp: str) -> list[str]:
    steps = 6 if tiny else 300
    presets = {"DVGO": ["experiment=dvgo_smoke", "model.coarse.alpha_init=0.01"], "NeRF": ["experiment=nerf_smoke"],
               "NeuS": ["experiment=neus_smoke"], "PU-INN": ["experiment=pu_inn_smoke"],
               "Proto-Depth": ["experiment=proto_depth_smoke"]}
    if tiny:
        presets["DVGO"] += ["model.coarse.iters=3", "model.fine.iters=3", "model.fine.pg_scale=[2]"]
    common = ["callbacks=memory", "callbacks.mesh=null", f"trainer.max_steps={steps}", "++trainer.limit_test_batches=1",
              "trainer.val_check_interval=100000", "kernels=auto"]
    common += ["callbacks.memory_growth.window=4"] if tiny else []
    common += [f"paths.data_dir={data_dir}"] if data_dir else []
    common += ["trainer=gpu"] if CUDA else []
    rows = ["| method (smoke preset) | steps | growth MiB/step | leak found |", "|---|---|---|---|"]
    for name, over in presets.items():
        try:
            m, _ = train_run([*over, *common], tmp, f"memory_{name}")
            rows.append(f"| {name} | {m['train/steps']} | {m['memory/growth_mb_per_step'] if m['memory/growth_mb_per_step'] is None else format(m['memory/growth_mb_per_step'], '.4f')} | {m['memory/leak_found']} |")
        except Exception as e:  # noqa: BLE001 - one method failing does not hide the others
            rows.append(f"| {name} | | failed: {str(e)[-300:]} | |")
        print(rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------------------- PU-INN
def pu_inn_section(tiny: bool, meshes: str | None, tests: str | None, minutes: float, data_dir: str | None,
                   tmp: str) -> list[str]:
    """``experiment=pu_inn_meshes_cpu`` trained for ``minutes`` (Lightning's ``max_time``; lr constant, as the
    step count is not known in advance), then tested on the PU-GAN pairs (CD, HD x1e-3; one patch layout)."""
    if tiny:
        label, seconds = "generated patches (`experiment=pu_inn_smoke`)", 20
        over = ["experiment=pu_inn_smoke", "model.gt_oversample=2"]
    elif meshes and tests:
        label, seconds = f"`experiment=pu_inn_meshes_cpu` on {Path(meshes).name}", int(minutes * 60)
        over = ["experiment=pu_inn_meshes_cpu", f"data.root={meshes}", f"data.test_root={tests}",
                f"data.cache_dir={Path(tmp) / 'patch_cache'}", "model.test_layouts=1"]
    else:
        return ["skipped: no PU-INN training meshes and test pairs (--pu-meshes, --pu-tests)"]
    over += ["model.iters=1000000", "model.lr_decay_every=1000000", f"+trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
             "trainer.val_check_interval=1000000", "callbacks.model_checkpoint.every_n_train_steps=1000000"]
    over += [f"paths.data_dir={data_dir}"] if data_dir else []
    over += ["trainer=gpu"] if CUDA else []
    m, wall = train_run(over, tmp, "pu_inn")
    shapes = json.loads((Path(tmp) / "pu_inn" / "test_scores.json").read_text())
    rows = [f"PU-INN, {label}, trained for {seconds} s at lr 1e-3 (no decay), tested on {len(shapes)} shapes "
            "(CD, HD x1e-3; one patch layout)", "",
            "| steps | steps/s | " + " | ".join(f"{s['name']} CD | {s['name']} HD" for s in shapes) + " | `mm:ss` (all in) |",
            "|---|---|" + "---|---|" * len(shapes) + "---|",
            f"| {m['train/steps']} | {m['train/steps'] / m['time/train_s']:.2f} | "
            + " | ".join(f"{s['test/cd']:.3f} | {s['test/hd']:.2f}" for s in shapes) + f" | {mmss(wall)} |"]
    print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy sizes (runs anywhere; CPU: Triton interpreted)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--lego", default=None, help="nerf_synthetic/lego (default: .gpu-data/lego or data/nerf_synthetic/lego)")
    p.add_argument("--dvgo-schedule", default="fifth", choices=["fifth", "full"])
    p.add_argument("--budget-s", type=float, default=480.0, help="sections that would start after this are skipped")
    p.add_argument("--data-dir", default=None, help="where generated scenes are written (paths.data_dir)")
    p.add_argument("--pu-meshes", default=None, help="PU-INN training meshes (default .gpu-data/pu_train_meshes)")
    p.add_argument("--pu-tests", default=None, help="PU-GAN test pairs (default .gpu-data/pu_gan/test)")
    p.add_argument("--pu-minutes", type=float, default=3.0, help="PU-INN's training time on the GPU")
    p.add_argument("--out", default=None, help="default bench/results/gpu.md (GPU) or bench/_runs/gpu_tiny.md")
    a = p.parse_args(argv)
    if not (CUDA or a.tiny):
        print("no GPU here: run with --tiny to check the script at toy sizes (Triton interpreted)")
        return 2
    if not kernels.triton_available():
        print("triton is not installed: pip install triton")
        return 2
    lego = a.lego or next((str(q) for q in (ROOT / ".gpu-data" / "lego", ROOT / "data" / "nerf_synthetic" / "lego")
                           if (q / "transforms_train.json").is_file()), None)
    pu_meshes = a.pu_meshes or next((str(q) for q in (ROOT / ".gpu-data" / "pu_train_meshes",) if q.is_dir()), None)
    pu_tests = a.pu_tests or next((str(q) for q in (ROOT / ".gpu-data" / "pu_gan" / "test",) if q.is_dir()), None)
    start = time.perf_counter()
    titles = {"parity": "Kernel parity on the device (torch reference vs Triton, values and gradients)",
              "ops": "Per op, torch vs Triton (forward + backward where the op has one)",
              "dvgo": "DVGO end to end (PSNR and mm:ss)", "dist": "Distortion loss (O(N) against the O(N^2) reference)",
              "render": "NeRF and NeuS speed (beside the reference GPU figures)", "memory": "Memory growth per method (smoke presets)",
              "pu_inn": "PU-INN: the CPU preset's network for a fixed time on the device"}
    lines = [f"Device: {device_name()}; torch {torch.__version__}; triton "
             f"{__import__('triton').__version__}; {platform.machine()}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`python bench/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(), ""]
    if a.tiny:
        lines += ["**Toy sizes** (`--tiny`)" + ("; Triton under its CPU interpreter: timings are not speeds" if not CUDA else ""), ""]
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for section in a.sections.split(","):
            lines += [f"## {titles[section]}", ""]
            elapsed = time.perf_counter() - start
            if elapsed > a.budget_s:
                why = f"skipped: the budget of {a.budget_s:.0f} s was used ({elapsed:.0f} s elapsed)"
                skipped.append(f"{section}: {why}")
                lines += [why, ""]
                continue
            print(f"== {section} ({elapsed:.0f} s elapsed)", flush=True)
            tic = time.perf_counter()
            try:
                body = {"parity": lambda: parity_section(a.tiny), "ops": lambda: ops_section(a.tiny),
                        "dvgo": lambda: dvgo_section(a.tiny, lego, a.dvgo_schedule, a.data_dir, tmp),
                        "dist": lambda: dist_section(a.tiny), "render": lambda: render_section(a.tiny),
                        "memory": lambda: memory_section(a.tiny, a.data_dir, tmp),
                        "pu_inn": lambda: pu_inn_section(a.tiny, pu_meshes, pu_tests, a.pu_minutes, a.data_dir, tmp),
                        }[section]()
            except Exception as e:  # noqa: BLE001 - report and go on to the next section
                body = [f"failed: {type(e).__name__}: {str(e)[-1500:]}"]
            if body and body[0].startswith(("skipped", "failed")):
                skipped.append(f"{section}: {body[0]}")
            lines += [*body, "", f"({time.perf_counter() - tic:.0f} s)", ""]
    lines += ["Skipped: " + ("; ".join(skipped) if skipped else "nothing"), ""]
    out = a.out or (ROOT / "bench" / ("_runs/gpu_tiny.md" if a.tiny else "results/gpu.md"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    emit("\n".join(lines), "gpu", str(out))
    for s in skipped:
        print("SKIPPED", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
