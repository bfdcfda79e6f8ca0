"""A run's saved config, for ``eval.py`` and for resuming: find a checkpoint's run, load the config that run saved,
and apply the command line's overrides to it (``key=value`` as Hydra takes them, ``group=option`` to swap a whole
group, e.g. ``data=lego``); decide which run dir ``train.py`` continues in (``resume=RUN``, ``ckpt_path=`` inside a
run dir, a requeued SLURM job) and from which checkpoint."""
from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from src.config import PROJECT_ROOT

log = logging.getLogger(__name__)
CONF_DIR = PROJECT_ROOT / "conf"


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run a checkpoint belongs to: ``RUN/checkpoints/<name>.ckpt`` -> ``RUN`` (else the file's folder)."""
    ckpt = Path(ckpt_path).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def checkpoint_step(path: str | Path) -> int:
    """The global step a Lightning checkpoint was written at (its tensors are mapped, not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of ``RUN/checkpoints`` with the most training steps (``last.ckpt`` on a tie, then
    ``final.ckpt``), or None; unreadable files (a write cut short by a kill) are passed over."""
    found = []
    for rank, path in enumerate(sorted((Path(run_dir) / "checkpoints").glob("*.ckpt"),
                                       key=lambda p: (p.name != "last.ckpt", p.name != "final.ckpt", p.name))):
        try:
            found.append((checkpoint_step(path), -rank, path))
        except Exception:  # noqa: BLE001 - not a checkpoint we can resume from; the others may be
            log.warning("resume: %s is not a readable checkpoint; passed over", path)
    return max(found)[2] if found else None


def _has_run_config(run_dir: Path) -> bool:
    return (run_dir / ".hydra" / "config.yaml").is_file() or (run_dir / "config.yaml").is_file()


def slurm_restarted() -> bool:
    """This SLURM job was requeued (SLURM counts its restarts)."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def slurm_tag() -> str:
    """The suffix of a SLURM job's run dir (``_slurm<job id>``), by which its requeued self finds it again."""
    from src.stop import on_slurm, slurm_job_id

    return f"_slurm{slurm_job_id()}" if on_slurm() and slurm_job_id() else ""


def resume_dir(resume: str | None, ckpt_path: str | None, runs_dir: str | Path, current: str | Path | None = None
               ) -> Path | None:
    """The run dir that ``train.py`` continues in, or None for a new run: ``resume=RUN``; the run dir of a
    ``ckpt_path`` inside one (``RUN/checkpoints/x.ckpt`` next to ``RUN/.hydra/config.yaml``); for a requeued SLURM
    job, its own run dir (``current``, a sweep job's fixed folder, or the newest ``runs_dir/*_slurm<job id>``) once
    it holds a checkpoint."""
    if resume:
        return Path(str(resume)).expanduser().resolve()
    if ckpt_path and _has_run_config(run_dir_of(ckpt_path)):
        return run_dir_of(ckpt_path)
    if slurm_restarted():
        if current is not None and latest_checkpoint(current) is not None:
            return Path(current).resolve()
        mine = sorted(Path(runs_dir).glob(f"*{slurm_tag()}")) if slurm_tag() else []
        mine = [d for d in mine if latest_checkpoint(d) is not None]
        if mine:
            return mine[-1].resolve()
    return None


@lru_cache(maxsize=1)
def _started() -> str:
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def hydra_run_dir(runs_dir: str, stamp: str, _root_) -> str:
    """``hydra.run.dir`` of ``train.py``: the run being resumed (:func:`resume_dir`), else a new
    ``runs_dir/<stamp>`` (``_slurm<job id>`` appended in a SLURM job, so its requeued self finds it)."""
    found = _resumable(runs_dir, _root_)
    if found is not None:
        return str(found)
    return f"{runs_dir}/{stamp}" + (slurm_tag() if "resume" in _root_ else "")


def hydra_output_subdir(runs_dir: str, _root_) -> str:
    """Where Hydra writes its record of the command: ``.hydra``, or for a resumed run ``.hydra/resumed_<time>`` so the
    run's own ``.hydra/config.yaml`` (what it was started with, what eval.py reads) is kept."""
    return f".hydra/resumed_{_started()}" if _resumable(runs_dir, _root_) is not None else ".hydra"


def _resumable(runs_dir: str, root) -> Path | None:
    """The run dir ``train.py`` continues in, when it is one (eval.py, which has no ``resume`` key: never). A
    ``resume=`` that is not a run dir gets a new folder here, and :func:`resumed_config` says what is wrong with it
    (Hydra would otherwise create the mistyped folder before the error)."""
    if "resume" not in root:
        return None
    found = resume_dir(root.get("resume"), root.get("ckpt_path"), runs_dir)
    return found if found is not None and _has_run_config(found) else None


def load_run_config(ckpt_path: str | Path) -> tuple[DictConfig, Path]:
    """The composed config the checkpoint's run saved (:func:`saved_config`), and that run's dir."""
    run_dir = run_dir_of(ckpt_path)
    return saved_config(run_dir, f"ckpt_path={ckpt_path}"), run_dir


def saved_config(run_dir: Path, what: str) -> DictConfig:
    """The composed config the run in ``run_dir`` saved, with its interpolations (``.hydra/config.yaml``, written
    by Hydra or by the pipeline), or the resolved ``config.yaml`` (its run-dir paths then re-pointed by the
    caller through ``paths.output_dir``). ``what`` names the command-line key for the error."""
    for name in (".hydra/config.yaml", "config.yaml"):
        if (run_dir / name).is_file():
            cfg = OmegaConf.load(run_dir / name)
            with open_dict(cfg):
                cfg.setdefault("hydra_saved_output_dir", None)
                cfg.hydra_saved_output_dir = None if name.startswith(".hydra") else str(cfg.paths.output_dir)
            return cfg
    raise FileNotFoundError(f"{what}: its run config is missing (looked for {run_dir}/.hydra/config.yaml "
                            f"and {run_dir}/config.yaml, which train.py writes beside checkpoints/)")


def _group_node(group: str, option: str) -> DictConfig:
    """``conf/<group>/<option>.yaml`` composed as ``train.py <group>=<option>`` would (its defaults included),
    interpolations kept."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside eval.py's @hydra.main (same conf/ tree)
        composed = compose("train", overrides=[f"{group}={option}"])
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            composed = compose("train", overrides=[f"{group}={option}"])
    if group not in composed:  # a preset of the global package (experiment=...): it sets keys all over the config
        raise ValueError(f"{group}={option}: a conf/{group} preset sets keys across the whole config and cannot be "
                         "applied to a saved run's config; override the keys you want to change instead")
    return composed[group]


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Hydra command-line overrides applied to a saved config: ``a.b=v``, ``+a.b=v``, ``~a.b``, and
    ``group=option`` for a config group of ``conf/`` (the group's node is replaced by that option's)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values = []
    for o in parsed:
        key = o.key_or_group
        if "." not in key and (CONF_DIR / key).is_dir() and isinstance(o.value(), str) and not o.is_delete():
            option = o.value()
            if not (CONF_DIR / key / f"{option}.yaml").is_file():
                choices = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
                raise ValueError(f"{key}={option}: no such option in conf/{key} (choices: {', '.join(choices)})")
            with open_dict(cfg):
                cfg[key] = _group_node(key, option)
        else:
            values.append(o)
    with open_dict(cfg):
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


def repoint(cfg: DictConfig, out_dir: str) -> DictConfig:
    """Point the config at the new run dir: ``paths.output_dir``, and for a resolved saved config every path
    under the old run dir (loggers); no checkpoint callback (an evaluation trains nothing)."""
    old = cfg.get("hydra_saved_output_dir")
    with open_dict(cfg):
        del cfg["hydra_saved_output_dir"]
    if old:  # a resolved config: every path inside the old run dir moves to the new one
        def walk(node):
            for k in list(node.keys()) if isinstance(node, DictConfig) else range(len(node)):
                if OmegaConf.is_config(node._get_node(k)):
                    walk(node[k])
                elif isinstance(node[k], str) and (node[k] == old or node[k].startswith(old.rstrip("/") + "/")):
                    node[k] = out_dir + node[k][len(old.rstrip("/")):]
        walk(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = out_dir
        cfg.ckpt_path = None
        if cfg.get("callbacks") is not None and "model_checkpoint" in cfg.callbacks:
            del cfg.callbacks["model_checkpoint"]
    return cfg


def resumed_config(cfg: DictConfig, overrides: list[str], current: str | Path) -> DictConfig:
    """What ``train.py`` trains when it continues a run (:func:`resume_dir`; ``cfg`` unchanged when it does not): the
    config that run saved, this command line's overrides applied to it (except ``resume`` and ``ckpt_path``), the
    run dir as ``paths.output_dir`` and its newest checkpoint (or the ``ckpt_path`` given) as ``ckpt_path``."""
    runs_dir = Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs"
    run_dir = resume_dir(cfg.get("resume"), cfg.get("ckpt_path"), runs_dir, current)
    if run_dir is None:
        return cfg
    what = f"resume={cfg.resume}" if cfg.get("resume") else f"ckpt_path={cfg.ckpt_path}" if cfg.get("ckpt_path") \
        else f"the requeued SLURM job's run dir {run_dir}"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{what}: no such run dir")
    if not _has_run_config(run_dir):
        raise FileNotFoundError(f"{what}: not a run dir of train.py (no .hydra/config.yaml or config.yaml in {run_dir})")
    ckpt = Path(cfg.ckpt_path).resolve() if cfg.get("ckpt_path") else latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{what}: {run_dir}/checkpoints holds no checkpoint to resume from (the run stopped "
                                "before its first training step, or its checkpoints were deleted); start the run again")
    saved = saved_config(run_dir, what)
    # a requeued SLURM job runs its first command line again, which the saved config already holds
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "ckpt_path="))]
    if cfg.get("resume") or cfg.get("ckpt_path"):
        saved = apply_overrides(saved, keep)
    with open_dict(saved):
        saved.pop("hydra_saved_output_dir", None)
        saved.paths.output_dir = str(run_dir)
        saved.ckpt_path = str(ckpt)
        saved.resume = str(run_dir)
    log.info("continuing %s from %s", run_dir, ckpt)
    return saved
