"""Sampling along rays for MLP fields (NeRF, NeuS): stratified depths between near and far, and
hierarchical (inverse-CDF) sampling from per-bin weights. Shapes are dense: (n_rays, n_samples)."""
from __future__ import annotations

import torch


def stratified_depths(near: torch.Tensor, far: torch.Tensor, n_samples: int, perturb: bool,
                      lindisp: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n_samples`` depths per ray (n_rays, n_samples), evenly spaced in depth (or in inverse depth with
    ``lindisp``) between near and far (n_rays,); with ``perturb``, one uniform sample inside each interval."""
    u = torch.linspace(0.0, 1.0, n_samples, device=near.device, dtype=near.dtype)
    if lindisp:
        z = 1.0 / (1.0 / near[:, None] * (1 - u) + 1.0 / far[:, None] * u)
    else:
        z = near[:, None] * (1 - u) + far[:, None] * u
    if perturb:
        mids = 0.5 * (z[:, 1:] + z[:, :-1])
        upper = torch.cat([mids, z[:, -1:]], -1)
        lower = torch.cat([z[:, :1], mids], -1)
        r = torch.rand(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        z = lower + (upper - lower) * r
    return z


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n_samples: int, det: bool,
               generator: torch.Generator | None = None, midpoints: bool = False) -> torch.Tensor:
    """Inverse-transform samples (n_rays, n_samples) from the piecewise-constant density whose bin edges
    are ``bins`` (n_rays, B + 1) and bin weights ``weights`` (n_rays, B). ``det``: at evenly spaced CDF
    levels, 0..1 (NeRF) or the midpoints of n equal parts of [0, 1] with ``midpoints`` (NeuS); else uniform
    random levels. Returned sorted; carries no gradient (as in NeRF)."""
    weights = weights.detach() + 1e-5  # no empty bins, no division by zero
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)  # (n_rays, B + 1)
    if det:
        lo, hi = (0.5 / n_samples, 1.0 - 0.5 / n_samples) if midpoints else (0.0, 1.0)
        u = torch.linspace(lo, hi, n_samples, device=bins.device, dtype=bins.dtype).expand(cdf.shape[0], n_samples)
    else:
        u = torch.rand(cdf.shape[0], n_samples, device=bins.device, dtype=bins.dtype, generator=generator)
    u = u.contiguous()
    idx = torch.searchsorted(cdf, u, right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
    denom = torch.where(cdf_hi - cdf_lo < 1e-5, torch.ones_like(cdf_lo), cdf_hi - cdf_lo)
    t = (u - cdf_lo) / denom
    return torch.sort((bin_lo + t * (bin_hi - bin_lo)).detach(), -1).values
