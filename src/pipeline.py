"""Build everything from a composed config, train, test, and write ``metrics.json`` into the run dir."""
from __future__ import annotations

import json
import logging
import math
import time
import zipfile
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src import kernels
from src.loggers import wandb_loggers
from src.callbacks.memory import peak_rss_mb, reset_peak_rss
from src.metrics import lpips_model

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's peak resident memory (VmHWM) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def _finish_loggers(trainer: L.Trainer) -> None:
    """Close W&B runs (a multirun trains several in one process) and say how to upload offline ones."""
    for logger in wandb_loggers(trainer):
        experiment = logger.experiment
        offline = getattr(experiment.settings, "mode", "") == "offline"
        run_dir = Path(experiment.dir).parent
        experiment.finish()
        import wandb  # only reached with a W&B logger

        if wandb.run is None:
            # finish() can return before the W&B service has flushed and closed the run's record log; tearing
            # the service down waits for that, so the run dir is complete (`wandb sync`-able) when we return.
            wandb.teardown()
        if offline and trainer.is_global_zero:
            log.info("W&B run saved offline in %s; upload it with: wandb sync %s", run_dir, run_dir)


def check_checkpoint(path: str | None) -> None:
    """Stop before training when ``ckpt_path`` is not a readable Lightning checkpoint, naming the file
    (Lightning's own error for a corrupt file ends in a pickle message that does not)."""
    if path is None:
        return
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint file")
    try:
        if not zipfile.is_zipfile(path):  # torch.save's format (Lightning's too)
            raise ValueError("not a torch.save archive")
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mapped: tensors not read here
    except Exception as e:  # noqa: BLE001 - any unreadable file: say which one
        raise ValueError(f"ckpt_path={path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"ckpt_path={path}: not a Lightning checkpoint (no state_dict)")


def run(cfg: DictConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` and test it; returns the flat metrics written to metrics.json."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    reset_peak_memory()  # memory/peak_mb is this run's (a multirun trains several in one process)
    if cfg.get("kernels") is not None:
        kernels.set_backend(cfg.kernels.backend, **(cfg.kernels.get("ops") or {}))
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    check_checkpoint(cfg.ckpt_path)
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
    for logger in trainer.loggers:  # the composed config, with every run (W&B: the run's config panel)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    tic = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    train_s = time.perf_counter() - tic
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    trainer.save_checkpoint(out_dir / "checkpoints" / "final.ckpt")

    datamodule.setup("test")
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {**fit_metrics, **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}}
    if "test/psnr" in metrics:  # image methods: say why LPIPS is missing rather than leave it out silently
        _, reason = lpips_model()
        if reason:
            metrics["test/lpips"] = f"unavailable: {reason}"
    backends = kernels.used_backends()
    metrics.update({
        "time/load_s": round(load_s, 2),
        "time/train_s": round(train_s, 2),
        **{f"time/{k}_s": round(v, 2) for k, v in getattr(model, "stage_time", {}).items()},
        "train/steps": int(trainer.global_step),
        "data/test_split": datamodule.test_split_used,
        "memory/peak_mb": round(peak_memory_mb(model.device), 1),
        # which backend each custom kernel ran on (only for methods that call any of them)
        **({f"kernels/{op}": b for op, b in backends.items()} if any("not called" not in b for b in backends.values()) else {}),
    })
    for cb in trainer.callbacks:  # callbacks with a summary (memory growth, throughput, ...)
        if hasattr(cb, "summary"):
            metrics.update(cb.summary())
    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if not k.startswith("kernels/")}))
        log.info("run dir: %s", out_dir)
    _finish_loggers(trainer)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        log.warning("non-finite metrics: %s", bad)
    return metrics
