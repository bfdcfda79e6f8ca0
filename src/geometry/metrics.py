"""Chamfer distance and F-score between surfaces given as dense point samples (the DTU protocol's
point-to-point form); nearest neighbours by :func:`src.geometry.knn.knn_points`."""
from __future__ import annotations

import torch

from src.geometry.knn import knn_points


def nearest_distances(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """For each point of ``src`` (N, 3), the Euclidean distance to its nearest point of ``dst`` (M, 3)."""
    return knn_points(src.double()[None], dst.double()[None], 1)[0][0, :, 0].sqrt()


def chamfer_fscore(pred: torch.Tensor, gt: torch.Tensor, threshold: float) -> dict[str, float]:
    """``accuracy``: mean distance of predicted points to the ground truth; ``completeness``: of ground-truth
    points to the prediction; ``chamfer``: their mean; ``precision`` / ``recall``: the fractions within
    ``threshold``; ``fscore``: their harmonic mean. An empty prediction scores inf / 0."""
    if pred.numel() == 0:
        return {"accuracy": float("inf"), "completeness": float("inf"), "chamfer": float("inf"),
                "precision": 0.0, "recall": 0.0, "fscore": 0.0}
    d_pred, d_gt = nearest_distances(pred, gt), nearest_distances(gt, pred)
    acc, comp = float(d_pred.mean()), float(d_gt.mean())
    precision, recall = float((d_pred < threshold).double().mean()), float((d_gt < threshold).double().mean())
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"accuracy": acc, "completeness": comp, "chamfer": 0.5 * (acc + comp), "precision": precision,
            "recall": recall, "fscore": fscore}
