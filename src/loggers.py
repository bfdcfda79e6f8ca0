"""Logger factories the ``conf/logger`` presets build (a CSV logger and a W&B logger that a resumed run continues
in place), and what a run sends to W&B when it ends."""
from __future__ import annotations

import csv
import json
import logging
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; a run resumed in place from a
    checkpoint at global step ``keep_below`` keeps the rows of the steps before it instead (rows of later steps,
    logged after that checkpoint was written, are logged again by the resumed run) and appends."""

    def __init__(self, log_dir: str, keep_below: int) -> None:
        self.keep_below = keep_below
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("step") or int(float(r["step"])) < self.keep_below]
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # new keys rewrite the header, as for a fresh file


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` (``conf/logger/csv.yaml``), which :meth:`continue_from` makes keep and append to the
    ``metrics.csv`` of the run it resumes in place."""

    _keep_below: int | None = None

    def continue_from(self, step: int) -> None:
        """Keep the rows of the steps before ``step`` (the resumed checkpoint's global step); call before logging."""
        self._keep_below = int(step)

    @property
    def experiment(self):
        if self._experiment is None and self._keep_below is not None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_below)
        return super().experiment


def wandb_run_id(save_dir: str | Path) -> str | None:
    """The id of the W&B run recorded under ``<save_dir>/wandb`` (its newest ``[offline-]run-<time>-<id>``
    folder), which a run resumed in place logs to again; None when there is none."""
    runs = sorted((p for p in (Path(save_dir) / "wandb").glob("*run-*-*") if p.is_dir()),
                  key=lambda p: p.name.split("run-", 1)[1])
    return runs[-1].name.rsplit("-", 1)[1] if runs else None


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
    # Lightning always passes wandb.init(anonymous=None); wandb >= 0.19 deprecated the setting and prints "The
    # anonymous setting has no effect" for any value it is given, None included. We never set it: drop the key.
    if getattr(logger, "_wandb_init", {}).get("anonymous", "") is None:
        del logger._wandb_init["anonymous"]
    if mode == "offline":
        log.info("W&B is offline (no login found): the run is saved under %s/wandb; upload it later with "
                 "`wandb sync %s/wandb/offline-run-*`", save_dir, save_dir)
    return logger


def wandb_loggers(trainer) -> list:
    """The trainer's W&B loggers (what dashboards-only artifacts - images, tables - are sent to)."""
    return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def _media(run_dir: Path, file: str):
    """A W&B media object for a file a test step wrote: images, and point clouds (``.xyz``) as 3D objects."""
    import numpy as np
    import wandb

    path = run_dir / file
    if not path.is_file():
        return None
    if path.suffix == ".png":
        return wandb.Image(str(path))
    if path.suffix == ".xyz":
        return wandb.Object3D(np.loadtxt(path, dtype=np.float32).reshape(-1, 3))
    return None


def wandb_results(trainer, run_dir: Path, metrics: dict) -> None:
    """What W&B keeps of a finished run: every ``metrics.json`` key in the run summary; the test items
    (``test_scores.json``) as the table ``test/items`` (item, its images or point cloud, its scores); the mesh
    (``mesh.ply``) as a 3D object."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    rows_file = run_dir / "test_scores.json"
    rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
    table = None
    if rows:
        key = next(k for k in ("view", "map", "name") if k in rows[0])
        media = list(dict.fromkeys(Path(f).stem.split("_", 1)[-1] if Path(f).suffix == ".png" else "points"
                                   for r in rows for f in r.get("files", [])))
        scores = list(dict.fromkeys(k for r in rows for k in r if k.startswith("test/")))
        table = wandb.Table(columns=[key, *media, *scores])
        for r in rows:
            by_kind = {(Path(f).stem.split("_", 1)[-1] if Path(f).suffix == ".png" else "points"): _media(run_dir, f)
                       for f in r.get("files", [])}
            table.add_data(r[key], *[by_kind.get(m) for m in media], *[r.get(k) for k in scores])
    mesh = None
    if (run_dir / "mesh.ply").is_file():
        import trimesh

        glb = run_dir / "mesh.glb"  # W&B shows glb / obj / stl, not ply
        trimesh.load(run_dir / "mesh.ply", force="mesh").export(glb)
        mesh = wandb.Object3D(str(glb))
    for logger in loggers:
        run = logger.experiment
        run.summary.update({k: v for k, v in metrics.items()})
        if table is not None:
            run.log({"test/items": table})
        if mesh is not None:
            run.log({"test/mesh": mesh})
