"""Distortion loss (mip-NeRF 360) over flattened samples, via torch_efficient_distloss.

``L = sum_ij w_i w_j |s_i - s_j| + 1/3 sum_i w_i^2 interval``, averaged over rays. On CUDA the package's
``flatten_eff_distloss`` takes the flat layout; it JIT-compiles CUDA and cannot run on a CPU, so there
the samples are padded to (n_rays, max_samples) (zero weights add nothing) for its O(N) ``eff_distloss``.
"""
from __future__ import annotations

import torch

from src.kernels.reference import ray_layout


def distortion_loss(weights: torch.Tensor, s: torch.Tensor, interval: float, ray_id: torch.Tensor,
                    n_rays: int) -> torch.Tensor:
    from torch_efficient_distloss import eff_distloss, flatten_eff_distloss

    if weights.is_cuda:
        return flatten_eff_distloss(weights, s, interval, ray_id)
    pos, counts, _ = ray_layout(ray_id, n_rays)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    w = weights.new_zeros(n_rays, width).index_put((ray_id, pos), weights)
    m = s.new_zeros(n_rays, width).index_put((ray_id, pos), s)
    return eff_distloss(w, m, interval)
