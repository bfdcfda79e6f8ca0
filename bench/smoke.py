"""Every method's smoke preset, trained and tested as a user runs it, one table (printed and written).

Usage: python bench/smoke.py [--out bench/results/smoke_cpu.md] [--presets dvgo_smoke,nerf_smoke,...]

Each preset is ``python train.py experiment=<preset>`` in its own process with a fresh data dir (so the generated
scene or patches are made as on a fresh checkout; their generation is in the wall time, not in training). The table
has each method's key test metrics as ``metrics.json`` records them, its training seconds and the wall time all in.
These are the figures the slow tests hold each preset to; a refactor that leaves them unchanged left the methods
unchanged (the presets are seeded and run on one thread layout).
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
from _common import ROOT, device_name, emit  # bench/_common.py

PRESETS = ("dvgo_smoke", "nerf_smoke", "neus_smoke", "pu_inn_smoke", "proto_depth_smoke")
#: the metrics shown per method (metrics.json keys); a key a run did not record shows as "-"
KEYS = {"dvgo": ("test/psnr", "test/ssim"), "nerf": ("test/psnr", "test/ssim"),
        "neus": ("test/psnr", "mesh/chamfer", "mesh/fscore"), "pu_inn": ("test/cd", "test/hd", "test/p2f"),
        "proto_depth": ("test/chamfer", "test/slots_used")}


def run(preset: str, data_dir: Path, run_dir: Path) -> tuple[dict, float]:
    tic = time.perf_counter()
    subprocess.run([sys.executable, "train.py", f"experiment={preset}", f"paths.data_dir={data_dir}",
                    f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"], cwd=ROOT, check=True)
    return json.loads((run_dir / "metrics.json").read_text()), time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated experiment presets")
    parser.add_argument("--out", default=None, help="result file (default bench/results/smoke_<cpu|gpu>.md)")
    parser.add_argument("--work", default=None, help="keep the runs (and their metrics.json) here (default: a "
                        "temporary folder, removed after)")
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for preset in presets:
            metrics, wall = run(preset, work / "data", work / preset)
            method = preset.removesuffix("_smoke")
            scores = ", ".join(f"{k} {metrics[k]:.6g}" if isinstance(metrics.get(k), (int, float)) else f"{k} -"
                               for k in KEYS.get(method, ()))
            rows.append(f"| experiment={preset} | {scores} | {metrics.get('time/train_s', float('nan')):.1f} | "
                        f"{int(wall // 60)}:{wall % 60:04.1f} |")
            print(rows[-1], flush=True)
    command = "python bench/smoke.py" + ("" if presets == list(PRESETS) else f" --presets {args.presets}")
    emit("\n".join([
        f"Device: {device_name()}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by `{command}`",
        "",
        "Each preset in its own `train.py` process with a fresh data dir; scores as `metrics.json` records them "
        "(PU-INN: x1e-3).",
        "",
        "| run | test scores | training s | wall `m:ss` (all in) |",
        "|---|---|---|---|",
        *rows]), "smoke", args.out)


if __name__ == "__main__":
    main()
