"""Train and test a method: ``python train.py model=dvgo data=lego`` (see README and conf/)."""
import hydra
from omegaconf import DictConfig

import src.config  # noqa: F401  (registers the config resolvers)
from src.pipeline import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from src.callbacks.sweep import optimized_metric

    metrics = run(cfg)
    value = metrics.get(optimized_metric(cfg))
    return float(value) if isinstance(value, float) else None


if __name__ == "__main__":
    main()
