"""Mesh export after testing: marching cubes of the model's geometry field (NeuS: the SDF; DVGO and NeRF:
a density threshold), written as ``mesh.ply`` in world coordinates, and compared with the ground-truth
surface when the data has one (generated scenes): ``mesh/chamfer``, ``mesh/accuracy``, ``mesh/completeness``,
``mesh/fscore`` (at ``fscore_threshold`` world units) in ``metrics.json``, and ``mesh/chamfer_floor``: the
Chamfer distance between two independent exact samples of the true surface, the metric's resolution at
``n_points`` points (point-to-point Chamfer of a perfect mesh is this, not 0)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

from src.callbacks import SummaryCallback
from src.geometry.meshing import export_mesh, score_against_truth
from src.models.method import Method

log = logging.getLogger(__name__)


class MeshExport(SummaryCallback):
    """Args: resolution: grid vertices per axis (None: the model's ``mesh_resolution``; 0: off).
    n_points: surface samples for the metrics. fscore_threshold: distance counted as correct (world units)."""

    def __init__(self, resolution: int | None = None, n_points: int = 30000, fscore_threshold: float = 0.02,
                 block: int = 64) -> None:
        self.resolution, self.n_points, self.threshold, self.block = resolution, n_points, fscore_threshold, block
        self.metrics: dict[str, float | str] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        res = self.resolution if self.resolution is not None else pl_module.hparams.get("mesh_resolution", 0)
        if not res or not isinstance(pl_module, Method) or not pl_module.meshes or not trainer.is_global_zero:
            return
        tic = time.perf_counter()
        path = Path(trainer.default_root_dir) / "mesh.ply"
        verts, faces = export_mesh(pl_module, trainer.datamodule, path, res, self.block)
        self.metrics = {"mesh/vertices": len(verts), "mesh/faces": len(faces), "mesh/resolution": res,
                        "time/mesh_s": round(time.perf_counter() - tic, 2)}
        log.info("wrote %s (%d vertices, %d faces, %d^3 grid)", path, len(verts), len(faces), res)
        scores = score_against_truth(verts, faces, trainer.datamodule, self.n_points, self.threshold)
        if scores is None:
            self.metrics["mesh/chamfer"] = "unavailable: the data has no ground-truth surface"
            return
        self.metrics.update({f"mesh/{k}": v for k, v in scores.items()})
        self.metrics["mesh/fscore_threshold"] = self.threshold
        log.info("mesh vs ground truth: chamfer %.4f (acc %.4f, comp %.4f; floor of the sampling %.4f), F-score@%g %.3f",
                 scores["chamfer"], scores["accuracy"], scores["completeness"], scores["chamfer_floor"],
                 self.threshold, scores["fscore"])

    def summary(self) -> dict[str, float | str]:
        return dict(self.metrics)
