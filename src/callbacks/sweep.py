"""A Hydra callback: when a multirun ends, one table of every job's setting and result.

Writes ``<sweep dir>/summary.md`` (and prints it): per job, the overrides that vary across the sweep, test
PSNR and SSIM, training wall time, peak memory and it/s, read from each job's ``metrics.json``, in the
form of seed 000's tables. Jobs that failed (no ``metrics.json``) are listed as failed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _mmss(seconds) -> str:
    if not isinstance(seconds, (int, float)) or seconds != seconds:
        return ""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def summarize(sweep_dir: Path) -> str:
    jobs = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        jobs.append((job_dir.name, dict(o.split("=", 1) for o in overrides if "=" in o), metrics))
    varying = [k for k in dict.fromkeys(k for _, o, _ in jobs for k in o)
               if len({o.get(k) for _, o, _ in jobs}) > 1] or [k for k in dict.fromkeys(k for _, o, _ in jobs for k in o)]
    head = ["job", *varying, "test PSNR", "test SSIM", "train `mm:ss`", "peak MB", "it/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for num, overrides, m in jobs:
        cells = [num, *[str(overrides.get(k, "")) for k in varying]]
        if m is None:
            cells += ["failed (no metrics.json)", "", "", "", ""]
        else:
            cells += [f"{m.get('test/psnr', float('nan')):.2f}", f"{m.get('test/ssim', float('nan')):.3f}",
                      _mmss(m.get("time/train_s", float("nan"))), f"{m.get('memory/peak_mb', float('nan')):.0f}",
                      str(m.get("throughput/it_s", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table = summarize(sweep_dir)
        (sweep_dir / "summary.md").write_text(f"Sweep {sweep_dir}\n\n{table}\n")
        log.info("sweep summary (%s):\n%s", sweep_dir / "summary.md", table)
