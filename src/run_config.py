"""What ``eval.py`` does before testing: find a checkpoint's run, load the config that run saved, and apply the
command line's overrides to it (``key=value`` as Hydra takes them, ``group=option`` to swap a whole group, e.g.
``data=lego``)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from src.config import PROJECT_ROOT

log = logging.getLogger(__name__)
CONF_DIR = PROJECT_ROOT / "conf"


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The run a checkpoint belongs to: ``RUN/checkpoints/<name>.ckpt`` -> ``RUN`` (else the file's folder)."""
    ckpt = Path(ckpt_path).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def load_run_config(ckpt_path: str | Path) -> tuple[DictConfig, Path]:
    """The composed config the checkpoint's run saved, with its interpolations (``.hydra/config.yaml``, written
    by Hydra or by the pipeline), or the resolved ``config.yaml`` (its run-dir paths then re-pointed by the
    caller through ``paths.output_dir``)."""
    run_dir = run_dir_of(ckpt_path)
    for name in (".hydra/config.yaml", "config.yaml"):
        if (run_dir / name).is_file():
            cfg = OmegaConf.load(run_dir / name)
            with open_dict(cfg):
                cfg.setdefault("hydra_saved_output_dir", None)
                cfg.hydra_saved_output_dir = None if name.startswith(".hydra") else str(cfg.paths.output_dir)
            return cfg, run_dir
    raise FileNotFoundError(f"ckpt_path={ckpt_path}: its run config is missing (looked for {run_dir}/.hydra/config.yaml "
                            f"and {run_dir}/config.yaml, which train.py writes beside checkpoints/)")


def _group_node(group: str, option: str) -> DictConfig:
    """``conf/<group>/<option>.yaml`` composed as ``train.py <group>=<option>`` would (its defaults included),
    interpolations kept."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside eval.py's @hydra.main (same conf/ tree)
        return compose("train", overrides=[f"{group}={option}"])[group]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"{group}={option}"])[group]


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
