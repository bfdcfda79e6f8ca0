"""Train and test a method: ``python train.py model=dvgo data=lego`` (see README and conf/); continue a stopped run in
its own folder with ``python train.py resume=RUN``."""
import sys

import hydra
from omegaconf import DictConfig

import src.config  # noqa: F401  (registers the config resolvers)
from src.pipeline import run
from src.stop import Stopped


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from src.callbacks.sweep import optimized_metric
    from src.run_config import resumed_config

    hydra_cfg = HydraConfig.get()
    cfg = resumed_config(cfg, list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)
    try:
        metrics = run(cfg)
    except Stopped as stopped:  # a signal: the message (checkpoint, resume command) is logged; exit as signalled
        sys.exit(stopped.exit_code)
    value = metrics.get(optimized_metric(cfg))
    return float(value) if isinstance(value, float) else None


if __name__ == "__main__":
    main()
