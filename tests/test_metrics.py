"""PSNR / SSIM as papers report them; LPIPS never invented."""
import math

import pytest
import torch
import torch.nn.functional as F

from src.metrics import lpips_model, psnr, ssim


def test_psnr_of_a_known_error():
    gt = torch.zeros(8, 8, 3)
    assert math.isclose(float(psnr(gt + 0.1, gt)), 20.0, abs_tol=1e-4)


def test_ssim_equals_a_direct_2d_gaussian_implementation():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(40, 36, 3, generator=g)
    pred = (gt + 0.1 * torch.randn(40, 36, 3, generator=g)).clamp(0, 1)
    x = torch.arange(11, dtype=torch.float32) - 5
    w1 = torch.exp(-0.5 * (x / 1.5) ** 2)
    w2 = (w1[:, None] * w1[None, :]) / w1.sum() ** 2  # 11x11 Gaussian, sigma 1.5

    def blur(z):
        return F.conv2d(z.permute(2, 0, 1)[:, None], w2[None, None])

    mu_x, mu_y = blur(pred), blur(gt)
    var_x, var_y = blur(pred * pred) - mu_x**2, blur(gt * gt) - mu_y**2
    cov = blur(pred * gt) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ref = ((2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))).mean()
    assert float(ssim(pred, gt)) == pytest.approx(float(ref), abs=1e-5)
    assert float(ssim(gt, gt)) == pytest.approx(1.0, abs=1e-6)
    assert float(ssim(pred, gt)) < 0.97  # noise of sigma 0.1 must show


def test_lpips_is_reported_unavailable_rather_than_estimated():
    model, reason = lpips_model()
    assert (model is None) == bool(reason)
