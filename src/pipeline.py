"""Build everything from a composed config, train, test, and write ``metrics.json`` into the run dir."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src import kernels
from src.metrics import lpips_model

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def run(cfg: DictConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` and test it; returns the flat metrics written to metrics.json."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("kernels") is not None:
        kernels.set_backend(cfg.kernels.backend, **(cfg.kernels.get("ops") or {}))
    torch.set_float32_matmul_precision("high")

    tic = time.perf_counter()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # fails here, naming the path, before anything is written
    datamodule.setup("fit")
    load_s = time.perf_counter() - tic

    model = instantiate(cfg.model, _convert_="all")  # plain containers: checkpoints load with weights_only
    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps is not None else model.total_steps
    trainer: L.Trainer = instantiate(cfg.trainer, max_steps=max_steps, default_root_dir=str(out_dir),
                                     callbacks=_instantiate_all(cfg.get("callbacks")),
                                     logger=_instantiate_all(cfg.get("logger")) or False)
    if trainer.is_global_zero:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    tic = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_s = time.perf_counter() - tic
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    trainer.save_checkpoint(out_dir / "checkpoints" / "final.ckpt")

    datamodule.setup("test")
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {**fit_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}}
    _, reason = lpips_model()
    if reason:
        metrics["test/lpips"] = f"unavailable: {reason}"
    metrics.update({
        "time/load_s": round(load_s, 2),
        "time/train_s": round(train_s, 2),
        **{f"time/{k}_s": round(v, 2) for k, v in getattr(model, "stage_time", {}).items()},
        "train/steps": int(trainer.global_step),
        "data/test_split": datamodule.test_split_used,
        **{f"kernels/{op}": backend for op, backend in kernels.used_backends().items()},
    })
    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if not k.startswith("kernels/")}))
        log.info("run dir: %s", out_dir)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        log.warning("non-finite metrics: %s", bad)
    return metrics
