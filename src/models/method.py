"""What a method is to the rest of the suite: the contract that ``src/pipeline.py``, ``eval.py``, the callbacks and
the sweeps rely on, and the test scoring every method shares (each item once, also under DDP).

A method is a LightningModule that subclasses :class:`Method` and says, as class attributes, which hyperparameter
holds its training steps (``steps_key``), which scores it is judged by (``key_metrics``) and, for ray methods,
which holds its rays per step (``rays_key``). Everything else it may add (stage times, a word on its numbers, a
camera-path video, a geometry field for meshing) has a default here, so the pipeline never asks ``hasattr``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch


class Method(L.LightningModule):
    """The base of every method's LightningModule.

    Class attributes: ``key_metrics``, the ``metrics.json`` scores the method is judged by (the first is what a
    sweep optimises by default); ``steps_key``, the hyperparameter with the number of training steps (the
    trainer's ``max_steps`` unless the config sets one); ``rays_key``, for methods that train on rays, the
    hyperparameter with the rays per step (throughput in rays/s); ``renders_path``: whether
    :meth:`render_path_video` renders a camera path; ``meshes``: whether :meth:`geometry_field` gives a field to
    mesh."""

    key_metrics: ClassVar[tuple[str, ...]] = ("test/psnr", "test/ssim")
    steps_key: ClassVar[str] = "iters"
    rays_key: ClassVar[str | None] = None
    renders_path: ClassVar[bool] = False
    meshes: ClassVar[bool] = False

    @property
    def total_steps(self) -> int:
        """Training steps of the configured schedule."""
        return int(self.hparams[self.steps_key])

    @property
    def rays_per_step(self) -> int | None:
        """Rays a training step draws (None: the method does not train on rays)."""
        return None if self.rays_key is None else int(self.hparams[self.rays_key])

    @property
    def stage_name(self) -> str:
        """The training stage now running (throughput is reported per stage)."""
        return "train"

    def stage_times(self) -> dict[str, float]:
        """Training seconds per stage, for methods with stages (``time/<stage>_s`` in metrics.json)."""
        return {}

    def fit_facts(self) -> dict:
        """A method's words on its validation numbers, into metrics.json beside them (e.g. which estimator)."""
        return {}

    # ---- validation scores: means over the unique items of every rank ---------------------------------
    def log_eval(self, scores: dict, batch_size: int = 1) -> None:
        """Add a validation batch's scores (each a mean over its ``batch_size`` items) to the epoch's sums; the epoch
        ends with their means over every rank's items (:meth:`log_eval_means`). Under DDP each item is validated on
        one rank only (``src/data/loaders.py``), and Lightning's own epoch sync (``sync_dist``) does not weight the
        ranks' unequal numbers of batches, so the sums are gathered here instead, once per validation."""
        sums = getattr(self, "_eval_sums", None)
        if sums is None:
            sums = self._eval_sums = {}
        for k, v in scores.items():
            total, n = sums.get(k, (0.0, 0))
            sums[k] = (total + float(v) * batch_size, n + batch_size)

    def log_eval_means(self) -> dict[str, float]:
        """Log (and return) the epoch's means of what :meth:`log_eval` summed, over every rank, and start afresh."""
        import torch.distributed as dist

        sums, self._eval_sums = getattr(self, "_eval_sums", None) or {}, {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, sums)  # a rank may have had no batch: its dict is empty
            sums = {}
            for part in parts:
                for k, (total, n) in part.items():
                    t, m = sums.get(k, (0.0, 0))
                    sums[k] = (t + total, m + n)
        means = {k: total / n for k, (total, n) in sums.items() if n}
        if means:
            self.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in means.items()}, sync_dist=False)
        return means

    def on_validation_epoch_end(self) -> None:
        self.log_eval_means()

    def render_path_video(self, dm, n_frames: int, out_dir: Path, loggers=(), fps: int = 30) -> Path | None:
        """RGB | depth along the datamodule's camera path into ``out_dir`` (methods with ``renders_path``)."""
        raise NotImplementedError(f"{type(self).__name__} renders no camera path (the ray methods do)")

    def geometry_field(self) -> dict:
        """What marching cubes triangulates (methods with ``meshes``): ``field`` (points (N, 3) -> values (N,)),
        ``bound_min`` / ``bound_max`` (the box), ``level`` (the surface's value) and ``inside`` (``"above"`` or
        ``"below"`` the level)."""
        raise NotImplementedError(f"{type(self).__name__} has no geometry field to mesh")


def gather_unique(rows: dict) -> list[dict]:
    """Per-item test rows ``{key: row}`` of every rank, each item once, in key order.

    Under DDP, Lightning's DistributedSampler pads the test set so that every rank gets as many items (3 views
    on 2 ranks: 4 batches, one view twice), and a mean over the logged batches counts the repeat; joining the
    ranks' rows by item key instead gives exactly the one-process mean."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
        rows = {k: v for part in parts for k, v in part.items()}
    return [rows[k] for k in sorted(rows)]


def finish_test(module: L.LightningModule, rows: dict, file: str = "test_scores.json") -> list[dict]:
    """Log the mean of each ``test/*`` score over the unique items of every rank (each rank logs the same value,
    so no sync is needed) and write the per-item rows to ``<run dir>/<file>``; returns the rows."""
    items = gather_unique(rows)
    keys = list(dict.fromkeys(k for r in items for k in r if k.startswith("test/") and isinstance(r[k], float)))
    means = {k: sum(r[k] for r in items if k in r) / sum(k in r for r in items) for k in keys}
    if means:
        module.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in means.items()}, sync_dist=False)
    if module.trainer.is_global_zero and items:
        Path(module.trainer.default_root_dir, file).write_text(json.dumps(items, indent=1))
    return items
