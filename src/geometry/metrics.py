"""Chamfer distance and F-score between surfaces given as dense point samples (the DTU protocol's
point-to-point form). pytorch3d's knn is used when importable; otherwise exact nearest neighbours by
blocked pairwise distances."""
from __future__ import annotations

import torch


def nearest_distances(src: torch.Tensor, dst: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """For each point of ``src`` (N, 3), the Euclidean distance to its nearest point of ``dst`` (M, 3)."""
    src, dst = src.double(), dst.double()
    try:
        from pytorch3d.ops import knn_points

        return knn_points(src[None], dst[None], K=1).dists[0, :, 0].sqrt()
    except ImportError:
        pass
    return torch.cat([torch.cdist(s, dst).amin(-1) for s in src.split(block)])


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
