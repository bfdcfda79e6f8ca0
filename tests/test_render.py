"""Rays, sampling and compositing against brute-force references (values and gradients)."""
import math

import pytest

import torch

from src import kernels
from src.geometry.camera import project_points
from src.render import composite, get_rays, intrinsics_from_fov, render_weights


def ragged(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    ray_id = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    alpha = torch.rand(ray_id.numel(), generator=g, dtype=torch.float64)
    return alpha, ray_id


def brute_force_weights(alpha, ray_id, n_rays):
    weights, T_last = torch.zeros_like(alpha), torch.ones(n_rays, dtype=alpha.dtype)
    for r in range(n_rays):
        T = torch.ones((), dtype=alpha.dtype)
        for i in (ray_id == r).nonzero()[:, 0].tolist():
            weights[i] = T * alpha[i]
            T = T * (1 - alpha[i])
        T_last[r] = T
    return weights, T_last


def test_alpha_compositing_matches_brute_force_on_ragged_rays():
    counts = [0, 1, 7, 0, 30, 2]  # empty rays, a single sample, many samples
    alpha, ray_id = ragged(counts)
    alpha[5] = 1.0  # a fully opaque sample stops the ray
    weights, T_last = render_weights(alpha, ray_id, len(counts))
    ref_w, ref_T = brute_force_weights(alpha, ray_id, len(counts))
    torch.testing.assert_close(weights, ref_w)
    torch.testing.assert_close(T_last, ref_T)
    assert T_last[0] == 1 and T_last[3] == 1
    torch.testing.assert_close(weights.sum() + T_last.sum(), torch.tensor(float(len(counts)), dtype=torch.float64))


def test_composite_rgb_and_gradients_match_brute_force():
    counts = [3, 0, 9, 1]
    alpha, ray_id = ragged(counts, seed=1)
    rgb = torch.rand(alpha.numel(), 3, dtype=torch.float64)
    alpha.requires_grad_(True)
    rgb.requires_grad_(True)
    w, T_last = render_weights(alpha, ray_id, 4)
    out = composite(w, rgb, ray_id, 4, T_last, background=1.0)
    ref_w, ref_T = brute_force_weights(alpha, ray_id, 4)
    ref = torch.zeros(4, 3, dtype=torch.float64).index_add(0, ray_id, ref_w[:, None] * rgb) + ref_T[:, None]
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.square().sum(), (alpha, rgb))
    g2 = torch.autograd.grad(ref.square().sum(), (alpha, rgb))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda a: kernels.alpha_to_weights(a, ray_id, 4)[0], (alpha.detach().requires_grad_(),))


def test_points_on_rays_are_evenly_spaced_inside_the_box():
    rays_o = torch.tensor([[0.0, 0.0, 3.0], [3.0, 0.2, 0.1], [5.0, 5.0, 5.0]])
    rays_d = torch.tensor([[0.0, 0.0, -2.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # the last misses the box
    lo, hi = -torch.ones(3), torch.ones(3)
    s = kernels.sample_pts_on_rays(rays_o, rays_d, lo, hi, near=0.0, far=1e9, stepdist=0.25)
    assert set(s["ray_id"].tolist()) == {0, 1}
    for r in (0, 1):
        pts = s["pts"][s["ray_id"] == r]
        gaps = (pts[1:] - pts[:-1]).norm(dim=-1)
        torch.testing.assert_close(gaps, torch.full_like(gaps, 0.25))
        assert ((pts >= lo) & (pts <= hi)).all()
        assert len(pts) == 8  # DVGO: ceil(2 / 0.25) samples from the entry face; the exit face is not sampled
        torch.testing.assert_close(pts[0], rays_o[r] + rays_d[r] * s["t"][s["ray_id"] == r][0])


def test_projection_inverts_rays():
    K = intrinsics_from_fov(64, 48, 0.8)
    c2w = torch.tensor([[0.0, -0.6, 0.8, 3.2], [1.0, 0.0, 0.0, 0.1], [0.0, 0.8, 0.6, 2.4]])
    rays_o, rays_d = get_rays(48, 64, K, c2w)
    pts = (rays_o + 2.5 * rays_d).reshape(-1, 3)
    uv, depth = project_points(pts, K, c2w)
    v, u = torch.meshgrid(torch.arange(48) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    torch.testing.assert_close(uv, torch.stack([u, v], -1).reshape(-1, 2), atol=1e-3, rtol=0)
    torch.testing.assert_close(depth, torch.full_like(depth, 2.5))
    assert math.isclose(float(K[0, 0]), 32 / math.tan(0.4), rel_tol=1e-6)


def test_distortion_loss_equals_the_quadratic_definition_on_ragged_rays():
    """Seed 003's O(N^2) definition, per ray, averaged over rays (rays without samples contribute 0)."""
    distortion_loss = kernels.distortion_loss

    counts = [4, 0, 1, 9]
    w, ray_id = ragged(counts, seed=2)
    s = torch.rand(w.numel(), dtype=torch.float64).sort().values
    interval = 0.1
    ref = 0.0
    for r in range(len(counts)):
        wr, sr = w[ray_id == r], s[ray_id == r]
        ref += (wr[:, None] * wr[None, :] * (sr[:, None] - sr[None, :]).abs()).sum() + (interval * wr**2).sum() / 3
    assert float(distortion_loss(w, s, interval, ray_id, len(counts))) == pytest.approx(float(ref) / len(counts), rel=1e-6)
