"""The foundation's two measurements, side by side in one run, as a table (printed and written).

1. ``python train.py`` (the README's bare command): the generated scene, data generation included.
2. ``experiment=dvgo_lego_cpu data.root=<lego>``: lego at 100x100 (val used as test when test is absent).

Usage: python bench/foundation.py [--lego PATH] [--out bench/results/foundation_cpu.md] [--skip-lego]
Each run is a separate ``train.py`` process; wall time includes start-up, loading and testing.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import device_name  # bench/_common.py

ROOT = Path(__file__).resolve().parents[1]


def train(args: list[str], run_dir: Path) -> tuple[dict, float]:
    tic = time.perf_counter()
    subprocess.run([sys.executable, "train.py", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *args],
                   cwd=ROOT, check=True)
    return json.loads((run_dir / "metrics.json").read_text()), time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lego", default=str(ROOT / "data" / "nerf_synthetic" / "lego"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "foundation_cpu.md"))
    parser.add_argument("--skip-lego", action="store_true")
    args = parser.parse_args()
    device = device_name()

    # a fresh data_dir, so the bare run generates its scene as on a fresh checkout
    cases = [("python train.py (generated scene, data generation included)", ["paths.data_dir={tmp}/data"], 28.0, 180.0)]
    if not args.skip_lego:
        cases.append(("experiment=dvgo_lego_cpu (lego 100x100)", ["experiment=dvgo_lego_cpu", f"data.root={args.lego}"],
                      29.0, 720.0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, overrides, bar_psnr, bar_s) in enumerate(cases):
            metrics, wall = train([o.format(tmp=tmp) for o in overrides], Path(tmp) / f"run{k}")
            psnr = metrics["test/psnr"]
            rows.append(f"| {name} | {metrics['data/test_split']} | {psnr:.2f} | {metrics['test/ssim']:.3f} "
                        f"| {int(wall // 60)}:{wall % 60:04.1f} | {metrics['time/coarse_s']:.0f} / {metrics['time/fine_s']:.0f} "
                        f"| >= {bar_psnr:.0f} dB in < {bar_s / 60:.0f} min: "
                        f"{'yes' if psnr >= bar_psnr and wall < bar_s else 'NO'} |")
    table = "\n".join([
        f"Device: {device}; torch {torch.__version__}; {platform.processor() or platform.machine()}; "
        f"measured {time.strftime('%Y-%m-%d %H:%M')} by `python bench/foundation.py`",
        "",
        "| run | test split | PSNR | SSIM | wall `m:ss` (all in) | coarse / fine train s | bar met |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
