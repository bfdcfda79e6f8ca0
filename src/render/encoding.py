"""Frequency (positional) encoding of coordinates, shared by the MLP fields (DVGO's colour MLP, NeRF)."""
from __future__ import annotations

import torch


def positional_encoding(x: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """``[x, sin(2^k x), cos(2^k x)]`` for k < n_freqs: (..., 3) -> (..., 3 + 6 n_freqs). The columns are
    NeRF's gamma (input kept) grouped by function (DVGO's layout): a fixed permutation of NeRF's interleaved
    order, which the first linear layer absorbs."""
    freqs = 2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)
    emb = (x[..., None] * freqs).flatten(-2)  # (..., 3 n_freqs)
    return torch.cat([x, emb.sin(), emb.cos()], -1)
