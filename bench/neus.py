"""NeuS speed beside the reference GPU figures (5 it/s training, 60 s to render an image), and the mesh that
``experiment=neus_synthetic_cpu`` reaches on the generated scene within 15 minutes on this machine.

Usage:
  python bench/neus.py                 # speeds (published network sizes), then the generated-scene run
  python bench/neus.py --skip-train    # speeds only
Writes bench/results/neus_<cpu|gpu>.md.

Training it/s: 512 rays from one image, 64 + 64 samples in 4 up-sampling steps, SDF 8x256 with its gradient,
colour 4x256 (NeuS's wmask configuration), median over timed steps after a warm-up. Render: an 800x600
view (DTU scan24 at half resolution), chunks of 512 rays as NeuS renders. On a GPU
whole images are rendered; on a CPU a band of whole rows is rendered and the table reports ms per ray.
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

from src.models.neus import NeuSModule

DEV = "cuda" if CUDA else "cpu"


def _rays(n: int):
    g = torch.Generator().manual_seed(0)
    rays_o = torch.tensor([0.0, 0.0, 2.5]).expand(n, 3).contiguous()
    rays_d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g) * 0.15 - torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    return rays_o.to(DEV), rays_d.to(DEV)


def train_speed(steps: int) -> float:
    torch.manual_seed(0)
    model = NeuSModule().to(DEV).train()  # published sizes
    rays_o, rays_d = _rays(512)
    target = torch.rand(512, 3, device=DEV)

    def loss() -> torch.Tensor:
        out, eikonal = model._render(rays_o, rays_d)
        return (out["rgb"] - target).abs().mean() + 0.1 * eikonal

    return steps_per_second(optimizer_step(model, loss, 5e-4), steps)


def render_speed(h: int, w: int, full: bool) -> dict:
    torch.manual_seed(0)
    model = NeuSModule().to(DEV).eval()
    rows = h if full else max(1, 2000 // w)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, rows, device=DEV), torch.linspace(-1, 1, w, device=DEV), indexing="ij")
    rays_d = torch.stack([xs * 0.3, ys * 0.3, -torch.ones_like(xs)], -1)
    rays_o = torch.zeros_like(rays_d) + torch.tensor([0.0, 0.0, 2.5], device=DEV)
    return render_rate(model, rays_o, rays_d, h)


def generated_run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp}/run", "trainer.enable_progress_bar=false",
                        "experiment=neus_synthetic_cpu", f"paths.data_dir={tmp}/data"], cwd=ROOT, check=True)
        wall = time.perf_counter() - tic
        m = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    return {**m, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-train", action="store_true", help="skip the generated-scene run")
    add_speed_args(p)
    a = p.parse_args()
    device = device_name()
    it_s = train_speed(a.train_steps)
    print(f"train it/s: {it_s:.3f}", flush=True)
    render = render_speed(600, 800, full=CUDA)
    print("render 800x600:", render, flush=True)
    cell = (f"{render['s_per_img']:.2f} s/img ({60 / render['s_per_img']:.2f}x the seed's 60 s)" if render["full"] else
            f"{render['ms_per_ray']:.3f} ms/ray, measured on {render['rays']:,} rays (whole image not rendered)")
    lines = [f"Device: {device}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`python bench/neus.py{' --skip-train' if a.skip_train else ''}`", "",
             "| measure | reference | ours |", "|---|---|---|",
             f"| training it/s (512 rays, 64 + 64 samples in 4 up-sampling steps, SDF 8x256 + gradient, colour 4x256) "
             f"| 5 it/s (a GPU) | {it_s:.3f} it/s ({it_s / 5:.2f}x the seed; median of {a.train_steps} steps) |",
             f"| render 800x600 (DTU scan24 half resolution; 512-ray chunks) | 60 s/img | {cell} |"]
    if not a.skip_train:
        r = generated_run()
        lines += ["", "| run | steps | test PSNR (held-out views) | mesh Chamfer (acc / comp) | Chamfer floor | "
                  "F-score @0.02 | wall `m:ss` (all in) |", "|---|---|---|---|---|---|---|",
                  f"| experiment=neus_synthetic_cpu (generated scene, 64x64, 42 training views; mesh 128^3) | "
                  f"{r['train/steps']} | {r['test/psnr']:.2f} | {r['mesh/chamfer']:.4f} ({r['mesh/accuracy']:.4f} / "
                  f"{r['mesh/completeness']:.4f}) | {r['mesh/chamfer_floor']:.4f} | {r['mesh/fscore']:.3f} | "
                  f"{int(r['wall'] // 60)}:{r['wall'] % 60:04.1f} |"]
    emit("\n".join(lines), "neus", a.out)


if __name__ == "__main__":
    main()
