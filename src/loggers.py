"""Logger factories the ``conf/logger`` presets build."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(save_dir: str, project: str = "neural3d", name: str | None = None, group: str | None = None,
                 mode: str = "auto", tags: list[str] | None = None, **kwargs):
    """A Lightning ``WandbLogger``; ``mode=auto`` is online when the user is logged in, offline otherwise
    (the run is then kept under ``<save_dir>/wandb`` and ``wandb sync`` uploads it later)."""
    from lightning.pytorch.loggers import WandbLogger

    if mode == "auto":
        mode = "online" if wandb_logged_in() else "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(save_dir=save_dir, project=project, name=name, group=group, mode=mode, tags=tags,
                         log_model=False, **kwargs)
    if mode == "offline":
        log.info("W&B is offline (no login found): the run is saved under %s/wandb; upload it later with "
                 "`wandb sync %s/wandb/offline-run-*`", save_dir, save_dir)
    return logger


def wandb_loggers(trainer) -> list:
    """The trainer's W&B loggers (what dashboards-only artifacts - images, tables - are sent to)."""
    return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
