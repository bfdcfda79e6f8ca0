"""Evaluate a trained checkpoint without training: ``python eval.py ckpt_path=RUN/checkpoints/final.ckpt
[render=test|path|both] [overrides]``. The run's own saved config is loaded and the overrides (``data.root=...``,
``data=lego``, ``data.test_root=...``, ``data.test_split=val``, ``model.render_path_frames=60``, ...) are applied to
it; results go to a new run dir under ``outputs/eval/``. See README "Evaluate a checkpoint"."""
import sys

import hydra
from omegaconf import DictConfig

import src.config  # noqa: F401  (registers the config resolvers)
from src.stop import Stopped

# eval.py's own keys and Hydra's flags; every other argument overrides the run's saved config
_OWN = ("ckpt_path=", "render=", "task_name=", "hydra.", "hydra/", "paths.log_dir=")
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--info", "-i", "--experimental-rerun"}


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    own, run_overrides, i = [argv[0]], [], 1
    while i < len(argv):
        arg = argv[i]
        if arg in _FLAGS_WITH_VALUE and i + 1 < len(argv):
            own += argv[i:i + 2]
            i += 2
            continue
        (own if arg.startswith("-") or arg.startswith(_OWN) else run_overrides).append(arg)
        i += 1
    return own, run_overrides


sys.argv, RUN_OVERRIDES = _split_argv(sys.argv)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from pathlib import Path

    from src.run_config import apply_overrides, load_run_config, repoint
    from src.pipeline import evaluate

    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    run_cfg, run_dir = load_run_config(ckpt)
    run_cfg = repoint(apply_overrides(run_cfg, RUN_OVERRIDES), cfg.paths.output_dir)
    try:
        metrics = evaluate(run_cfg, str(ckpt), cfg.render,
                           source={"ckpt_path": str(ckpt), "run_dir": str(run_dir), "overrides": " ".join(RUN_OVERRIDES)})
    except Stopped as stopped:  # a signal: the message is logged; exit as signalled
        sys.exit(stopped.exit_code)
    from src.callbacks.sweep import optimized_metric

    value = metrics.get(optimized_metric(run_cfg))
    return float(value) if isinstance(value, float) else None


if __name__ == "__main__":
    main()
