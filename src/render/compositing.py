"""Alpha compositing over flattened samples (``ray_id`` sorted), built from the ops in ``src.kernels``; and
the same weights for a dense (rays, samples) layout."""
from __future__ import annotations

import torch

from src import kernels


def render_weights(alpha: torch.Tensor, ray_id: torch.Tensor, n_rays: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``w_i = alpha_i prod_{j<i}(1 - alpha_j)`` (M,) and the transmittance left after each ray (n_rays,)."""
    weights, _, T_last = kernels.alpha_to_weights(alpha, ray_id, n_rays)
    return weights, T_last


def dense_weights(alpha: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Weights ``w_i = alpha_i prod_{j<i}(1 - alpha_j + eps)`` for alpha (n_rays, S) laid out densely
    (NeuS uses ``eps = 1e-7``), (n_rays, S)."""
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + eps], -1), -1)[:, :-1]
    return alpha * trans


def composite(
    weights: torch.Tensor, values: torch.Tensor, ray_id: torch.Tensor, n_rays: int,
    T_last: torch.Tensor | None = None, background: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``C_r = sum_i w_i c_i + T_last_r * background``; values (M, C) -> (n_rays, C)."""
    out = kernels.segment_sum(weights[:, None] * values, ray_id, n_rays)
    if background is not None:
        out = out + T_last[:, None] * background
    return out
