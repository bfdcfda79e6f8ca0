"""Build everything from a composed config, train, test, and write ``metrics.json`` into the run dir."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
import warnings
import zipfile
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from src import kernels, stop
from src.callbacks import SummaryCallback
from src.callbacks.stop import StopOnSignal
from src.data.cache import AtomicCheckpointIO
from src.loggers import wandb_loggers, wandb_results
from src.metrics import lpips_model
from src.models.method import Method
from src.process import peak_rss_mb, reset_peak_rss, share_cores_in_parallel_sweeps
from src.run_config import checkpoint_step, latest_checkpoint, run_dir_of

log = logging.getLogger(__name__)

# Lightning warns, with a pasted code example, that a ModelCheckpoint of a manually optimised module (DVGO) holds
# the state *after* the step's optimizer update. That is what resuming needs here: a checkpoint at global step N
# holds N updates and training resumes at step N (tests/test_dvgo.py: a resumed run ends as an uninterrupted one).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
# Lightning 2.6's pytree helper calls an isinstance check that torch >= 2.10 deprecates; nothing for a user to do.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)


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
        if offline and trainer.is_global_zero:  # a resumed run's segments share the run id: sync them all
            segments = f"{run_dir.parent}/offline-run-*-{experiment.id}"
            log.info("W&B run saved offline in %s; upload it with: wandb sync %s", run_dir, segments)


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


def check_writable(out_dir: Path) -> None:
    """Stop before anything is read or trained when the run dir cannot be made or written (a read-only mount, a
    full disk, another user's folder), naming ``paths.output_dir``."""
    probe = out_dir / f".write_probe_{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"paths.output_dir={out_dir}: the run dir cannot be written ({e.strerror or e}); "
                              "point paths.log_dir (or hydra.run.dir) at a writable folder") from e


def _setup(cfg: DictConfig) -> Path:
    out_dir = Path(cfg.paths.output_dir)
    check_writable(out_dir)
    L.seed_everything(cfg.seed, workers=True)
    reset_peak_memory()  # memory/peak_mb is this run's (a multirun trains several in one process)
    share_cores_in_parallel_sweeps()
    if cfg.get("kernels") is not None:
        kernels.set_backend(cfg.kernels.backend, **(cfg.kernels.get("ops") or {}))
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    return out_dir


def _loggers(cfg: DictConfig, out_dir: Path, resume_step: int | None) -> list:
    """The configured loggers; for a run resumed in place (``resume_step``: its checkpoint's global step) the CSV
    log keeps its earlier rows and the W&B run is continued under its id (one run, not two)."""
    from src.loggers import CSVLogger, wandb_run_id

    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if c is None or "_target_" not in c:
            continue
        extra = {}
        if resume_step is not None and c._target_ == "src.loggers.wandb_logger":
            run_id = wandb_run_id(c.save_dir)
            if run_id:
                extra = {"id": run_id, "resume": "allow"}
        logger = instantiate(c, **extra)
        if resume_step is not None and isinstance(logger, CSVLogger):
            logger.continue_from(resume_step)
        loggers.append(logger)
    return loggers


def _trainer(cfg: DictConfig, out_dir: Path, max_steps: int, resume_step: int | None = None) -> L.Trainer:
    trainer: L.Trainer = instantiate(cfg.trainer, max_steps=max_steps, default_root_dir=str(out_dir),
                                     callbacks=[*_instantiate_all(cfg.get("callbacks")),
                                                StopOnSignal(out_dir / "checkpoints")],  # src/stop.py
                                     logger=_loggers(cfg, out_dir, resume_step) or False,
                                     plugins=[AtomicCheckpointIO()])  # a kill mid-write keeps the last checkpoint
    if trainer.is_global_zero:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        saved = out_dir / ".hydra" / "config.yaml"  # Hydra writes it for command-line runs; eval.py reads it
        if not saved.is_file():
            saved.parent.mkdir(exist_ok=True)
            saved.write_text(OmegaConf.to_yaml(cfg))
    for logger in trainer.loggers:  # the composed config, once, with every run (W&B: the run's config panel)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def _method(cfg: DictConfig) -> Method:
    """The configured method (plain containers: checkpoints load with ``weights_only``)."""
    model = instantiate(cfg.model, _convert_="all")
    if not isinstance(model, Method):
        raise TypeError(f"model._target_={cfg.model._target_}: a method must subclass src.models.method.Method "
                        f"(got {type(model).__name__})")
    return model


def resumes_in_place(cfg: DictConfig) -> bool:
    """Whether ``cfg.ckpt_path`` belongs to the run dir ``cfg.paths.output_dir`` itself (``train.py resume=RUN``,
    ``ckpt_path=RUN/checkpoints/...`` from the command line, a requeued SLURM job): the run continues there."""
    return bool(cfg.ckpt_path) and run_dir_of(cfg.ckpt_path) == Path(cfg.paths.output_dir).resolve()


def run(cfg: DictConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` and test it; returns the flat metrics written to metrics.json. A signal
    (SIGTERM, SIGINT; under SLURM the requeue signal) stops it within seconds with :class:`src.stop.Stopped`, after
    writing ``last.ckpt`` if a step was taken; its message says how to resume."""
    with stop.handling_signals():
        return _run(cfg)


def _run(cfg: DictConfig) -> dict:
    out_dir = _setup(cfg)
    check_checkpoint(cfg.ckpt_path)
    resume_step = checkpoint_step(cfg.ckpt_path) if resumes_in_place(cfg) else None
    if resume_step is not None:
        log.info("resuming in place in %s from %s (step %d)", out_dir, cfg.ckpt_path, resume_step)
    trainer = None
    try:
        tic = time.perf_counter()
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()  # fails here, naming the path, before anything is written
        datamodule.setup("fit")
        load_s = time.perf_counter() - tic

        model = _method(cfg)
        max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps is not None else model.total_steps
        trainer = _trainer(cfg, out_dir, max_steps, resume_step)

        tic = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        train_s = time.perf_counter() - tic
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        fit_metrics.update(model.fit_facts())  # a method's words on its numbers (e.g. estimators)
        trainer.save_checkpoint(out_dir / "checkpoints" / "final.ckpt", weights_only=False)  # resumable, as last.ckpt

        datamodule.setup("test")
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics = {**fit_metrics, **_test_metrics(trainer)}
        metrics.update({
            "time/load_s": round(load_s, 2),
            "time/train_s": round(train_s, 2),
            **{f"time/{k}_s": round(v, 2) for k, v in model.stage_times().items()},
            "train/steps": int(trainer.global_step),
        })
        return _report(trainer, model, datamodule, out_dir, metrics)
    except (stop.Stopped, SIGTERMException) as e:
        raise _stopped(e, trainer, out_dir) from None


def _stopped(e: BaseException, trainer: L.Trainer | None, out_dir: Path) -> stop.Stopped:
    """Close the loggers of a stopped run (the CSV rows so far written, W&B finished) and say what was kept and
    how to go on; the :class:`src.stop.Stopped` to raise."""
    stopped = e if isinstance(e, stop.Stopped) else stop.Stopped(stop.requested() or signal.SIGTERM, "training")
    guard = next((c for c in trainer.callbacks if isinstance(c, StopOnSignal)), None) if trainer else None
    last = latest_checkpoint(out_dir)
    name = signal.Signals(stopped.signum).name
    if trainer is not None:
        for logger in trainer.loggers:
            if type(logger).__name__ != "WandbLogger":
                logger.save()
        _finish_loggers(trainer)
    if last is not None:
        steps = f" of {trainer.max_steps}" if trainer is not None else ""
        msg = (f"Stopped by {name} during {stopped.where}. The run's last checkpoint is {last} (step "
               f"{checkpoint_step(last)}{steps}); continue this run in its own folder with:\n"
               f"    python train.py resume={out_dir}")
    else:
        when = "before the first training step" if trainer is None or trainer.global_step == 0 else "with no checkpoint"
        msg = (f"Stopped by {name} during {stopped.where}, {when}: no checkpoint was written, nothing to resume; "
               f"start the run again ({out_dir} holds no result).")
    if guard is not None and guard.requeue_note:
        msg += f"\n{guard.requeue_note}"
    if trainer is None or trainer.is_global_zero:
        log.warning(msg)
    stopped.message = msg
    return stopped


def evaluate(cfg: DictConfig, ckpt_path: str, render: str = "test", source: dict | None = None) -> dict:
    """Test the checkpoint ``ckpt_path`` of a run whose (saved, possibly overridden) config is ``cfg``, into the
    new run dir ``cfg.paths.output_dir``: metrics.json, test_scores.json, images / meshes / point clouds as a
    training run writes them. ``render``: ``test`` (the test split), ``path`` (only the camera-path video,
    ``model.render_path_frames`` frames, 120 when 0) or ``both``. ``source`` (what was evaluated: the checkpoint,
    its run, the overrides) goes into metrics.json under ``eval/*``. Returns the metrics."""
    if render not in ("test", "path", "both"):
        raise ValueError(f"render must be test, path or both, got {render!r}")
    try:
        with stop.handling_signals():
            return _evaluate(cfg, ckpt_path, render, source)
    except stop.Stopped as stopped:
        stopped.message = (f"Stopped by {signal.Signals(stopped.signum).name} during {stopped.where}: the evaluation "
                           f"of {ckpt_path} is incomplete (the checkpoint is untouched); run it again")
        log.warning(stopped.message)
        raise


def _evaluate(cfg: DictConfig, ckpt_path: str, render: str, source: dict | None) -> dict:
    out_dir = _setup(cfg)
    check_checkpoint(ckpt_path)
    tic = time.perf_counter()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")  # test data only: no training split is read
    load_s = time.perf_counter() - tic
    model = _method(cfg)
    frames = model.hparams.get("render_path_frames") or 120
    if "render_path_frames" in model.hparams:
        model.hparams.render_path_frames = 0  # the video is rendered below, when asked, not after testing
    load_weights(model, ckpt_path)  # before the trainer, so a checkpoint that does not fit writes no config
    trainer = _trainer(cfg, out_dir, max_steps=-1)
    metrics: dict = {f"eval/{k}": v for k, v in (source or {}).items()}
    if render in ("test", "both"):
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(_test_metrics(trainer))
    if render in ("path", "both"):
        if not model.renders_path:
            raise ValueError(f"render={render}: {type(model).__name__} renders no camera path (image methods do)")
        model.to(trainer.strategy.root_device)
        if trainer.is_global_zero:
            tic = time.perf_counter()
            path = model.render_path_video(datamodule, frames, out_dir, wandb_loggers(trainer))
            metrics.update({"video/file": str(path), "video/frames": frames,
                            "time/video_s": round(time.perf_counter() - tic, 2)})
    metrics["time/load_s"] = round(load_s, 2)
    return _report(trainer, model, datamodule, out_dir, metrics)


def load_weights(model: Method, ckpt_path: str) -> None:
    """The checkpoint's weights into ``model`` as ``trainer.test(ckpt_path=...)`` would load them (the module's own
    hook first: DVGO reshapes its grids), without the training callbacks' state, which an evaluation has no use for.
    Weights that do not fit the configured method (another method's checkpoint, or a config whose sizes no longer
    match it) stop here with an error that names the file, the method and the first keys that differ."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    target = f"{type(model).__module__}.{type(model).__qualname__}"
    problems = []
    try:
        model.on_load_checkpoint(ckpt)  # may resize or add parameters to fit the checkpoint
    except Exception as e:  # noqa: BLE001 - the module's hook choked on another method's checkpoint
        problems.append(f"the module's checkpoint hook failed ({type(e).__name__}: {e})")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    resized = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems += [f"{len(keys)} {what} parameters (e.g. {', '.join(keys[:3])})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("resized", resized)) if keys]
    if problems:
        raise ValueError(f"ckpt_path={ckpt_path}: its weights do not fit model._target_={target}: "
                         f"{'; '.join(problems)}. Was it written by another method, or by a run with other "
                         "model sizes? eval.py reads the config of the checkpoint's own run; override model "
                         "settings only where the weights allow it")
    model.load_state_dict(state)


def _test_metrics(trainer: L.Trainer) -> dict:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if "test/psnr" in metrics:  # image methods: say why LPIPS is missing rather than leave it out silently
        _, reason = lpips_model()
        if reason:
            metrics["test/lpips"] = f"unavailable: {reason}"
    return metrics


def _report(trainer: L.Trainer, model, datamodule, out_dir: Path, metrics: dict) -> dict:
    """Add the run-wide figures and callback summaries to ``metrics``, write metrics.json, send the results to
    W&B (summary, test-item table, mesh), close the loggers."""
    backends = kernels.used_backends()
    metrics.update({
        "data/test_split": datamodule.test_split_used,
        "memory/peak_mb": round(peak_memory_mb(model.device), 1),
        # which backend each custom kernel ran on (only for methods that call any of them)
        **({f"kernels/{op}": b for op, b in backends.items()} if any("not called" not in b for b in backends.values()) else {}),
    })
    for cb in trainer.callbacks:  # callbacks with a summary (memory growth, throughput, ...)
        if isinstance(cb, SummaryCallback):
            metrics.update(cb.summary())
    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if not k.startswith("kernels/")}))
        log.info("run dir: %s", out_dir)
        wandb_results(trainer, out_dir, metrics)
    _finish_loggers(trainer)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        log.warning("non-finite metrics: %s", bad)
    return metrics
