"""A Hydra callback: when a multirun ends, one table of every job's setting and result, and the best job.

Writes ``<sweep dir>/summary.md`` (and prints it): per job, the overrides that vary across the sweep, the
method's key test metrics (its class's ``key_metrics``: DVGO / NeRF PSNR, SSIM, LPIPS; NeuS PSNR, mesh Chamfer,
F-score; PU-INN CD, HD, P2F; Proto-Depth Chamfer, slots used) with the optimised one first, training wall time,
peak memory and it/s, read from each job's ``metrics.json``, in the form of DVGO's speed-up tables (PSNR beside mm:ss); then the best job
by the optimised metric (``optimized_metric``, else the method's first key metric). Jobs that failed (no
``metrics.json``) are listed as failed.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


# ---- which scores a method is judged by ---------------------------------------------------------------
#: name fragments of scores where larger is better (everything else - Chamfer, HD, P2F, EMD, LPIPS, losses,
#: seconds, megabytes - is better smaller)
HIGHER_IS_BETTER = ("psnr", "ssim", "fscore", "precision", "recall", "it_s", "rays_s", "slots_used")


def higher_is_better(metric: str) -> bool:
    return any(part in metric.split("/")[-1] for part in HIGHER_IS_BETTER)


def key_metrics(model_target: str) -> tuple[str, ...]:
    """The scores a method is judged by (its class's ``key_metrics``; the first is what a sweep optimises by
    default), from the ``_target_`` of its config."""
    from hydra.utils import get_class

    from src.models.method import Method

    try:
        cls = get_class(model_target)
    except Exception:  # noqa: BLE001 - a class that no longer imports: the default scores of a method
        return Method.key_metrics
    return tuple(cls.key_metrics) if isinstance(cls, type) and issubclass(cls, Method) else Method.key_metrics


def optimized_metric(cfg) -> str:
    """``optimized_metric`` when set, else the method's first key metric."""
    return cfg.get("optimized_metric") or key_metrics(cfg.model._target_)[0]


def _mmss(seconds) -> str:
    if not isinstance(seconds, (int, float)) or seconds != seconds:
        return ""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, (int, float)):
        return "nan" if value != value else f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return "n/a" if str(value).startswith("unavailable") else str(value)


def _job_config(job_dir: Path) -> dict:
    for name in ("config.yaml", ".hydra/config.yaml"):
        if (job_dir / name).is_file():
            try:
                return yaml.safe_load((job_dir / name).read_text()) or {}
            except yaml.YAMLError:
                continue
    return {}


def summarize(sweep_dir: Path) -> tuple[str, str | None]:
    """The summary table of a sweep dir and the line naming the best job (None when no job has the metric)."""
    jobs = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        jobs.append((job_dir.name, dict(o.split("=", 1) for o in overrides if "=" in o), metrics, _job_config(job_dir)))
    known = [o for _, o, _, _ in jobs if o]  # a job dir without its overrides says nothing about what varies
    all_keys = list(dict.fromkeys(k for o in known for k in o))
    varying = [k for k in all_keys if len({o.get(k) for o in known}) > 1] or all_keys
    # the method's metrics (one method per sweep is the common case; a sweep over methods gets the union)
    targets = [t for t in dict.fromkeys((c.get("model") or {}).get("_target_", "") for _, _, _, c in jobs) if t]
    optimised = next((c["optimized_metric"] for _, _, _, c in jobs if c.get("optimized_metric")), None)
    columns = list(dict.fromkeys(m for t in targets for m in key_metrics(t)))
    optimised = optimised or (columns[0] if columns else "test/psnr")
    columns = [optimised, *[c for c in columns if c != optimised]]
    head = ["job", *varying, *[f"{c} (optimised)" if c == optimised else c for c in columns],
            "train `mm:ss`", "peak MB", "it/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    scored = []
    for num, overrides, m, _ in jobs:
        cells = [num, *[str(overrides.get(k, "")) for k in varying]]
        if m is None:
            cells += ["failed (no metrics.json)", *[""] * (len(columns) + 2)]
        else:
            cells += [_cell(m.get(c)) for c in columns]
            cells += [_mmss(m.get("time/train_s", float("nan"))), _cell(m.get("memory/peak_mb")),
                      _cell(m.get("throughput/it_s"))]
            value = m.get(optimised)
            if isinstance(value, (int, float)) and math.isfinite(value):
                scored.append((value, num, overrides))
        lines.append("| " + " | ".join(cells) + " |")
    best = None
    if scored:
        pick = max if higher_is_better(optimised) else min
        value, num, overrides = pick(scored, key=lambda s: s[0])
        setting = ", ".join(f"{k}={overrides.get(k, '')}" for k in varying)
        best = (f"best job by {optimised} ({'higher' if higher_is_better(optimised) else 'lower'} is better): "
                f"job {num} ({setting}): {optimised} = {value:.6g}")
    return "\n".join(lines), best


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table, best = summarize(sweep_dir)
        (sweep_dir / "summary.md").write_text(f"Sweep {sweep_dir}\n\n{table}\n" + (f"\n{best}\n" if best else ""))
        log.info("sweep summary (%s):\n%s", sweep_dir / "summary.md", table)
        if best:
            log.info(best)
