"""Image metrics as the papers report them.

PSNR is computed per image on float values and averaged over images (as DVGO reports it). SSIM uses
mip-NeRF's settings: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, 'valid' filtering, the mean
of the SSIM map over pixels and channels. LPIPS needs the ``lpips`` package *and* its backbone weights
on disk; without them it is reported as unavailable, never estimated.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of one image (any shape), values in [0, 1]: ``-10 log10(mean((pred - target)^2))``."""
    return -10 * torch.log10(F.mse_loss(pred.float(), target.float()))


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """SSIM of one image (H, W, C) in [0, 1], mip-NeRF's ``compute_ssim`` (separable Gaussian, valid)."""
    x = pred.float().permute(2, 0, 1)[:, None]  # (C, 1, H, W)
    y = target.float().permute(2, 0, 1)[:, None]
    w = _gaussian_window(size, sigma, x.device, x.dtype)

    def blur(z: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(z, w.view(1, 1, -1, 1))  # along H
        return F.conv2d(z, w.view(1, 1, 1, -1))  # along W

    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x**2).clamp(min=0)
    var_y = (blur(y * y) - mu_y**2).clamp(min=0)
    cov = blur(x * y) - mu_x * mu_y
    cov = torch.sign(cov) * torch.minimum((var_x * var_y).sqrt(), cov.abs())
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean()


@functools.lru_cache(maxsize=1)
def lpips_model() -> tuple[object | None, str]:
    """(model, '') when LPIPS (VGG) can run offline, else (None, the reason it cannot)."""
    try:
        import lpips  # noqa: F401  (optional; not a dependency)
    except ImportError:
        return None, "lpips package not installed"
    try:
        return lpips.LPIPS(net="vgg", verbose=False).eval(), ""
    except Exception as err:  # weights missing and no network: report, never invent
        return None, f"lpips backbone weights unavailable ({type(err).__name__})"
