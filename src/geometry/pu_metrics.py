"""Point-cloud upsampling metrics as the PU-GAN benchmark computes them: both clouds normalised to the unit
sphere (centred on their mean, divided by their furthest point's distance); CD the mean squared
nearest-neighbour distance from prediction to ground truth plus the same from ground truth to prediction;
HD the largest of those squared distances from prediction to ground truth plus the largest from ground truth to
prediction (as PU-GAN's released ``evaluate.py`` computes it; the larger of the two alone is between half and all
of it); P2F the distance of each predicted point to
the ground-truth mesh (exact point-to-triangle), mean and std; EMD the mean distance under the optimal
one-to-one matching (exact, :func:`emd_exact`) of the normalised clouds. Values are raw (the benchmark reports x1e-3)."""
from __future__ import annotations

import torch

from src.geometry.knn import knn_points


def normalize_unit_sphere(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3) -> points centred on their mean and scaled so the furthest lies on the unit sphere; also the
    centre and scale (to map other data, e.g. the mesh, the same way)."""
    centre = points.mean(0)
    scale = (points - centre).norm(dim=-1).max()
    return (points - centre) / scale, centre, scale


def cd_hd(pred: torch.Tensor, gt: torch.Tensor, normalize: bool = True) -> dict[str, float]:
    """PU-GAN's CD and HD (raw values; HD the sum of the two directions' largest squared distances, as PU-GAN's
    ``evaluate.py``) between clouds (N, 3) and (M, 3), and CD's two halves: ``cd_pred_to_gt``
    (mean squared distance of each predicted point to the ground truth: accuracy) and ``cd_gt_to_pred`` (of each
    ground-truth point to the prediction: coverage, high where the cloud leaves gaps)."""
    if normalize:
        pred, gt = normalize_unit_sphere(pred)[0], normalize_unit_sphere(gt)[0]
    pred, gt = pred.double()[None], gt.double()[None]
    fwd, bwd = knn_points(pred, gt, 1)[0], knn_points(gt, pred, 1)[0]
    return {"cd": float(fwd.mean() + bwd.mean()), "hd": float(fwd.max() + bwd.max()),
            "cd_pred_to_gt": float(fwd.mean()), "cd_gt_to_pred": float(bwd.mean())}


def closest_points_on_mesh(points: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor,
                           block: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The closest point of a mesh to each point (N, 3), and its exact Euclidean distance (N,): the closest
    point of each triangle by the region test of Ericson (Real-Time Collision Detection, 5.1.5), blocks of
    points against all triangles."""
    tri = verts.double()[faces]  # (F, 3, 3)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac = b - a, c - a
    near, dist = [], []
    for p in points.double().split(block):
        p = p[:, None]  # (B, 1, 3)
        ap, bp, cp = p - a, p - b, p - c
        d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
        d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
        d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
        va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
        denom = (va + vb + vc)
        denom = torch.where(denom.abs() < 1e-30, torch.full_like(denom, 1e-30), denom)
        v, w = vb / denom, vc / denom
        closest = a + ab * v[..., None] + ac * w[..., None]  # inside the face
        # edges
        t_ab = (d1 / (d1 - d3)).clamp(0, 1)
        e_ab = a + ab * t_ab[..., None]
        t_ac = (d2 / (d2 - d6)).clamp(0, 1)
        e_ac = a + ac * t_ac[..., None]
        t_bc = ((d4 - d3) / ((d4 - d3) + (d5 - d6))).clamp(0, 1)
        e_bc = b + (c - b) * t_bc[..., None]
        cond = {
            "a": (d1 <= 0) & (d2 <= 0), "b": (d3 >= 0) & (d4 <= d3), "c": (d6 >= 0) & (d5 <= d6),
            "ab": (vc <= 0) & (d1 >= 0) & (d3 <= 0), "ac": (vb <= 0) & (d2 >= 0) & (d6 <= 0),
            "bc": (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0),
        }
        q = closest
        # Ericson tests A, B, AB, C, AC, BC in that order: apply in reverse so the earlier test wins
        for key, pt in (("bc", e_bc), ("ac", e_ac), ("c", c.expand_as(q)), ("ab", e_ab), ("b", b.expand_as(q)),
                        ("a", a.expand_as(q))):
            q = torch.where(cond[key][..., None], pt.nan_to_num(), q)
        d, i = (p - q).norm(dim=-1).min(-1)
        near.append(q[torch.arange(q.shape[0]), i])
        dist.append(d)
    return torch.cat(near), torch.cat(dist)


def point_triangle_distance(points: torch.Tensor, verts: torch.Tensor, faces: torch.Tensor,
                            block: int = 512) -> torch.Tensor:
    """Exact Euclidean distance from each point (N, 3) to the nearest triangle of a mesh
    (:func:`closest_points_on_mesh`)."""
    return closest_points_on_mesh(points, verts, faces, block)[1]


def emd_exact(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Earth mover's distance between equal-size clouds (B, N, 3): the mean distance under the optimal
    one-to-one matching, found exactly (scipy's ``linear_sum_assignment``: a shortest-augmenting-path
    Jonker-Volgenant solver) on the detached distances; differentiable through the matched distances. (B,)
    PU-Net / PU-GAN computed EMD with an approximate (auction) matching, whose values can only be larger."""
    from scipy.optimize import linear_sum_assignment

    if pred.shape != gt.shape:
        raise ValueError(f"EMD needs clouds of equal size, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    d = torch.cdist(pred, gt)
    out = []
    for bi in range(d.shape[0]):
        rows, cols = linear_sum_assignment(d[bi].detach().cpu().double().numpy())
        out.append(d[bi, torch.as_tensor(rows), torch.as_tensor(cols)].mean())
    return torch.stack(out)
