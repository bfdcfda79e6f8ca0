"""A method's surface as a mesh: marching cubes of its geometry field (NeuS: the SDF; DVGO and NeRF: a density
threshold) written as a PLY in world coordinates, and scored against the scene's exact surface when it has one
(generated scenes). Used by the mesh callback after testing and by ``python -m src.export_mesh``."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from src.geometry.mesh import extract_mesh
from src.geometry.mesh_io import write_mesh
from src.geometry.metrics import chamfer_fscore
from src.geometry.sampling import sample_surface

if TYPE_CHECKING:
    from src.data.datamodule import RayScene
    from src.models.method import Method


def export_mesh(model: Method, datamodule: RayScene, path: str | Path, resolution: int, block: int = 64) -> tuple:
    """Triangulate ``model.geometry_field()`` at ``resolution``^3 and write it to ``path`` in world coordinates
    (``datamodule.to_world``). Returns (vertices, faces) in world coordinates."""
    geo = model.geometry_field()
    was_training = model.training
    model.eval()
    try:
        verts, faces = extract_mesh(geo["field"], geo["bound_min"], geo["bound_max"], resolution, geo["level"],
                                    block=block, device=model.device, inside=geo["inside"])
    finally:
        model.train(was_training)
    if len(verts):
        verts = datamodule.to_world(torch.from_numpy(verts)).numpy()
    write_mesh(path, verts, faces)
    return verts, faces


def mesh_metrics(verts: np.ndarray, faces: np.ndarray, gt: torch.Tensor, n_points: int,
                 threshold: float) -> dict[str, float]:
    """Chamfer / F-score between ``n_points`` samples of the mesh and the ground-truth points ``gt``."""
    pred = sample_surface(verts, faces, n_points) if len(faces) else torch.zeros(0, 3, dtype=torch.float64)
    return chamfer_fscore(pred, gt, threshold)


def score_against_truth(verts: np.ndarray, faces: np.ndarray, datamodule: RayScene, n_points: int,
                        threshold: float) -> dict[str, float] | None:
    """:func:`mesh_metrics` against the data's ground-truth surface, plus ``chamfer_floor`` (a second exact
    sample of the true surface against the first: the metric's resolution); None when the data has none."""
    gt = datamodule.gt_surface()
    if gt is None:
        return None
    scores = mesh_metrics(verts, faces, gt, n_points, threshold)
    scores["chamfer_floor"] = chamfer_fscore(datamodule.gt_surface(seed=2), gt, threshold)["chamfer"]
    return scores
