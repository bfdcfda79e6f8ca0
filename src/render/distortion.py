"""Distortion loss (mip-NeRF 360) over flattened samples: ``kernels.distortion_loss`` (O(N), forward and
backward, torch or Triton). Unlike ``torch_efficient_distloss.flatten_eff_distloss``, which JIT-compiles
CUDA, it also runs on a CPU; the package stays the comparison point in ``bench/kernels.py`` and the tests.

``L = mean over rays of [sum_ij w_i w_j |s_i - s_j| + 1/3 sum_i w_i^2 interval]``.
"""
from __future__ import annotations

import torch

from src import kernels


def distortion_loss(weights: torch.Tensor, s: torch.Tensor, interval: float | torch.Tensor, ray_id: torch.Tensor,
                    n_rays: int) -> torch.Tensor:
    return kernels.distortion_loss(weights, s, interval, ray_id, n_rays)
