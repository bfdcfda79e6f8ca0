"""OmegaConf resolvers the configs use; registered once, on import."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


def _multirun_group() -> str | None:
    """The sweep's name (its output dir) in a Hydra multirun, else None: one W&B group per sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(cfg.sweep.dir).name


if not OmegaConf.has_resolver("multirun_group"):
    OmegaConf.register_new_resolver("multirun_group", _multirun_group)


def _hydra_run_dir(runs_dir: str, stamp: str, *, _root_):
    from src.run_config import hydra_run_dir

    return hydra_run_dir(runs_dir, stamp, _root_)


def _hydra_output_subdir(runs_dir: str, *, _root_):
    from src.run_config import hydra_output_subdir

    return hydra_output_subdir(runs_dir, _root_)


# hydra.run.dir / hydra.output_subdir: a resumed run (resume=RUN, ckpt_path inside RUN, a requeued SLURM job)
# continues in its own folder; see src/run_config.py
if not OmegaConf.has_resolver("run_dir"):
    OmegaConf.register_new_resolver("run_dir", _hydra_run_dir)
if not OmegaConf.has_resolver("run_output_subdir"):
    OmegaConf.register_new_resolver("run_output_subdir", _hydra_output_subdir)


def check_positive(group: str, **values) -> None:
    """Stop with the config key's name when a count or size that must be positive is not
    (``check_positive("model", n_rand=0)`` -> ``model.n_rand must be > 0, got 0``)."""
    for key, value in values.items():
        if value is None or not value > 0:
            raise ValueError(f"{group}.{key} must be > 0, got {value!r}")
