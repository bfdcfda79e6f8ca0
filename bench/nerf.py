"""NeRF speed beside the reference GPU figures (4 it/s training, 21 s to render an image), and the test PSNR that
``experiment=nerf_lego`` at downscale 8 (100x100) reaches after 15 minutes of training.

Usage:
  python bench/nerf.py                   # speeds (published network sizes), then the 15-minute lego run
  python bench/nerf.py --skip-lego       # speeds only
  python bench/nerf.py --full-render [llff|blender]   # whole 800x800 / 504x378 renders on a CPU too (~48 / ~8 min)
Writes bench/results/nerf_<cpu|gpu>.md.

Training it/s: 1024 rays, 64 coarse + 128 fine samples, 8x256 MLPs (NeRF's lego configuration), median
over timed steps after a warm-up, on the generated scene (speed does not depend on the images). Render:
an 800x800 Blender view (64 + 128 samples) and a 504x378 LLFF view (fern: 64 + 64 samples, NDC), chunked
as in training runs (32768 rays a forward). On a GPU whole images are rendered; on a CPU, unless
``--full-render``, a band of whole rows is rendered and the table reports ms per ray and the rays measured.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import CUDA, ROOT, add_speed_args, device_name, emit, optimizer_step, render_rate, steps_per_second  # bench/_common.py

from src.models.nerf import NeRFModule

DEV = "cuda" if CUDA else "cpu"


def train_speed(steps: int) -> float:
    torch.manual_seed(0)
    model = NeRFModule().to(DEV)  # published sizes
    model.set_scene(2.0, 6.0, 1.0)
    rays_o = (torch.randn(1024, 3, device=DEV) * 0.1 + torch.tensor([0.0, 0.0, 4.0], device=DEV))
    rays_d = torch.nn.functional.normalize(torch.randn(1024, 3, device=DEV) * 0.2 - torch.tensor([0.0, 0.0, 1.0], device=DEV), dim=-1)
    target = torch.rand(1024, 3, device=DEV)

    def loss() -> torch.Tensor:
        out = model.render_rays(rays_o, rays_d)
        return torch.nn.functional.mse_loss(out["rgb"], target) + torch.nn.functional.mse_loss(out["coarse_rgb"], target)

    return steps_per_second(optimizer_step(model, loss, 5e-4), steps)


def render_speed(h: int, w: int, n_importance: int, ndc: bool, full: bool) -> dict:
    torch.manual_seed(0)
    model = NeRFModule(n_importance=n_importance).to(DEV).eval()
    model.set_scene(0.0, 1.0, 0.0) if ndc else model.set_scene(2.0, 6.0, 1.0)
    rows = h if full else max(1, 8000 // w)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, rows, device=DEV), torch.linspace(-1, 1, w, device=DEV), indexing="ij")
    rays_d = torch.stack([xs * 0.4, ys * 0.4, -torch.ones_like(xs)], -1)
    rays_o = torch.zeros_like(rays_d) + (torch.tensor([0.0, 0.0, -1.0], device=DEV) if ndc else torch.tensor([0.0, 0.0, 4.0], device=DEV))
    if ndc:
        rays_d = rays_d * torch.tensor([0.1, 0.1, -2.0], device=DEV)
    return render_rate(model, rays_o, rays_d, h)


def lego_15min(lego: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp}/run", "trainer.enable_progress_bar=false",
                        "experiment=nerf_lego", f"data.root={lego}", "data.downscale=8", "data.test_stride=20",
                        "+trainer.max_time=00:00:15:00", "trainer.limit_val_batches=0"], cwd=ROOT, check=True)
        wall = time.perf_counter() - tic
        m = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    return {"psnr": m["test/psnr"], "ssim": m["test/ssim"], "steps": m["train/steps"], "train_s": m["time/train_s"],
            "wall": wall, "split": m["data/test_split"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lego", default=str(ROOT / "data" / "nerf_synthetic" / "lego"))
    p.add_argument("--skip-lego", action="store_true")
    p.add_argument("--full-render", nargs="?", const="all", default=None, choices=["all", "blender", "llff"],
                   help="render whole images on a CPU too (all, or one of the two views)")
    add_speed_args(p)
    a = p.parse_args()
    device = device_name()
    it_s = train_speed(a.train_steps)
    print(f"train it/s: {it_s:.3f}", flush=True)
    blender = render_speed(800, 800, 128, ndc=False, full=CUDA or a.full_render in ("all", "blender"))
    print("render 800x800:", blender, flush=True)
    llff = render_speed(378, 504, 64, ndc=True, full=CUDA or a.full_render in ("all", "llff"))
    print("render 504x378:", llff, flush=True)

    def render_cell(r):
        if r["full"]:
            return f"{r['s_per_img']:.2f} s/img ({21 / r['s_per_img']:.2f}x the seed's 21 s)"
        return f"{r['ms_per_ray']:.3f} ms/ray, measured on {r['rays']:,} rays (whole image not rendered)"

    lines = [f"Device: {device}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`python bench/nerf.py{' --full-render ' + a.full_render if a.full_render else ''}{' --skip-lego' if a.skip_lego else ''}`", "",
             "| measure | reference | ours |", "|---|---|---|",
             f"| training it/s (1024 rays, 64 + 128 samples, 8x256 MLPs) | 4 it/s (a GPU) | {it_s:.3f} it/s "
             f"({it_s / 4:.2f}x the seed; median of {a.train_steps} steps) |",
             f"| render 800x800 Blender (64 + 128 samples) | 21 s/img | {render_cell(blender)} |",
             f"| render 504x378 LLFF (64 + 64 samples, NDC) | 21 s/img (its one render figure) | {render_cell(llff)} |"]
    if not a.skip_lego:
        r = lego_15min(a.lego)
        lines += ["", "| run | test split | steps in 15 min | test PSNR | SSIM | wall `m:ss` (all in) |", "|---|---|---|---|---|---|",
                  f"| experiment=nerf_lego data.downscale=8 (100x100), 15 min of training | {r['split']} every 20th view "
                  f"| {r['steps']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {int(r['wall'] // 60)}:{r['wall'] % 60:04.1f} |"]
    emit("\n".join(lines), "nerf", a.out)

if __name__ == "__main__":
    main()
