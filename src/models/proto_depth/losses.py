"""Proto-Depth's hybrid Chamfer loss: target-to-prediction over the k nearest predicted points, per-slot
prediction-to-target, and slot repulsion; computed by KNN (:func:`src.geometry.knn.knn_points`) or, as the
reference, all pairs (``dense=True``)."""
from __future__ import annotations

import torch

from src.geometry.knn import knn_points, knn_points_dense


def hybrid_chamfer(pred: torch.Tensor, target: torch.Tensor, trans: torch.Tensor, k_nearest: int = 3,
                   w_target: float = 1.0, w_slot: float = 1.0, w_repulse: float = 0.1, margin: float = 0.2,
                   dense: bool = False) -> dict[str, torch.Tensor]:
    """pred (B, K, S, 3): S points sampled on each of K slots; target (B, N, 3); trans (B, K, 3) slot
    positions. Terms (squared distances, means):
      target: each target point to its ``k_nearest`` nearest predicted points (any slot), averaged;
      slot:   each slot's points to their nearest target point, averaged per slot, then over slots (every
              slot must explain some of the data);
      repulse: ``relu(margin - |t_i - t_j|)^2`` over slot pairs (slots spread out).
    Returns the terms and their weighted sum ``loss``."""
    b, k, s, _ = pred.shape
    knn = knn_points_dense if dense else knn_points
    flat = pred.reshape(b, k * s, 3)
    d_target = knn(target, flat, k_nearest)[0].mean((1, 2))  # (B,)
    d_slot = knn(flat, target, 1)[0].reshape(b, k, s).mean(-1)  # (B, K)
    gap = torch.cdist(trans, trans)  # (B, K, K)
    off_diag = ~torch.eye(k, dtype=torch.bool, device=pred.device)
    repulse = (torch.relu(margin - gap) ** 2)[:, off_diag].mean(-1) if k > 1 else gap.new_zeros(b)
    terms = {"target": d_target.mean(), "slot": d_slot.mean(), "repulse": repulse.mean()}
    terms["loss"] = w_target * terms["target"] + w_slot * terms["slot"] + w_repulse * terms["repulse"]
    return terms


def slot_coverage(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of the target points (B, N, 3) whose nearest predicted point (B, K, S, 3) lies on each slot, (B, K)."""
    b, k, s, _ = pred.shape
    idx = knn_points(target, pred.reshape(b, k * s, 3), 1)[1][..., 0] // s  # (B, N) slot ids
    return torch.nn.functional.one_hot(idx, k).float().mean(1)
