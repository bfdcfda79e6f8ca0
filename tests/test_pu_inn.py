"""PU-INN's residual flow: log-det estimators against the brute-force log-determinant (``pytest -k logdet``),
unbiasedness of the Russian roulette, the Neumann gradient, the inverse and the Lipschitz bound."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from src.models.pu_inn.flow import ResidualBlock, SpectralNormLinear


def _block(dim=3, **kw) -> ResidualBlock:
    """A block far from the identity: g's maps are a rotation (plus noise) scaled far beyond the bound, so
    normalisation pins their spectral norms at ``coeff`` (0.75), and a large bias keeps LipSwish in its
    near-linear range: J_g has eigenvalues around 0.5, the log-det series needs many terms and truncation
    errors are large enough to see."""
    torch.manual_seed(0)
    kw = {"hidden": dim, "n_layers": 2, "coeff": 0.75, **kw}
    block = ResidualBlock(dim, **kw).double()
    rot = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))[0]
    if kw["hidden"] != dim:
        return block
    with torch.no_grad():
        first, second = [m for m in block.g if isinstance(m, SpectralNormLinear)]
        first.weight[:, :dim].copy_(20 * (rot + 0.2 * torch.randn(dim, dim, dtype=torch.float64)))
        first.weight[:, dim:].copy_(6 * torch.randn(dim, first.weight.shape[1] - dim, dtype=torch.float64))
        first.bias.fill_(5.0)
        second.weight.copy_(20 * rot.T)
    block.refresh(500)
    return block


def brute_force_logdet(block: ResidualBlock, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """slogdet(dy/dx) of y = x + g(x), one point at a time, with torch.autograd.functional.jacobian."""
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda p: p + block.g(p[None])[0], xi, create_graph=create_graph)
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def test_logdet_exact_and_exact_trace_match_brute_force():
    block = _block(eval_estimator="exact").eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    ref = brute_force_logdet(block, x)
    assert ref.abs().min() > 0.5  # a map far from the identity: the test sees errors
    torch.testing.assert_close(block(x)[1], ref, atol=1e-10, rtol=0)
    block.eval_estimator, block.n_terms = "exact_trace", 200
    torch.testing.assert_close(block(x)[1], ref, atol=1e-6, rtol=0)
    block.n_terms = 2  # a short series is visibly off
    assert (block(x)[1] - ref).abs().min() > 0.02


def test_logdet_fixed_hutchinson_averages_to_the_truncated_series():
    block = _block(eval_estimator="fixed", n_terms=6, n_samples=4000).eval()
    x = torch.randn(3, 3, dtype=torch.float64)
    est = block(x)[1]
    block.eval_estimator = "exact_trace"
    torch.testing.assert_close(est, block(x)[1], atol=0.03, rtol=0)


@pytest.mark.parametrize("name", ["poisson", "geometric"])
def test_logdet_russian_roulette_is_unbiased(name):
    """Over many draws (terms and vectors) the mean is the exact log-det, within 4 standard errors, while the
    first term alone is off by more than 5."""
    block = _block(eval_estimator=name, n_exact_terms=2, lam=2.0, p=0.3).eval()
    x = torch.randn(1, 3, dtype=torch.float64).expand(4000, 3).contiguous()  # one point, 4000 independent draws
    ref = brute_force_logdet(block, x[:1])[0]
    torch.manual_seed(1)
    draws = block(x)[1]
    err = (draws.mean() - ref).abs()
    assert err < 4 * draws.std() / len(draws) ** 0.5 + 1e-3, (float(draws.mean()), float(ref))
    block.eval_estimator, block.n_terms = "exact_trace", 1  # the trace alone: what the series corrects
    assert (block(x[:1])[1][0] - ref).abs() > 5 * draws.std() / len(draws) ** 0.5


def test_logdet_neumann_gradient_matches_the_exact_gradient():
    block = _block(estimator="poisson", neumann_grad=True, n_exact_terms=2, lam=2.0, n_samples=64).train()
    x = torch.randn(4, 3, dtype=torch.float64)
    params = [p for n, p in block.named_parameters() if "weight" in n]
    for m in block.g:
        if isinstance(m, SpectralNormLinear):
            m.n_iterations = 0  # keep the normalisation fixed while averaging

    def grads(fn):
        return torch.autograd.grad(fn().sum(), params)

    exact = grads(lambda: brute_force_logdet(block, x, create_graph=True))
    torch.manual_seed(2)
    draws = [grads(lambda: block(x)[1]) for _ in range(150)]
    mean = [torch.stack([d[i] for d in draws]).mean(0) for i in range(len(params))]
    for m, e in zip(mean, exact):
        assert (m - e).norm() < 0.1 * e.norm() + 1e-6, (float((m - e).norm()), float(e.norm()))


def test_flow_inverse_undoes_forward():
    block = _block().eval()
    x = torch.randn(100, 3, dtype=torch.float64) * 2
    y, _ = block(x, with_logdet=False)
    torch.testing.assert_close(block.inverse(y), x, atol=1e-5, rtol=0)


def test_flow_lipschitz_constant_stays_below_the_coefficient():
    block = _block(hidden=16)  # random hidden maps blown up x20: normalisation must bring them back
    with torch.no_grad():
        for m in block.g:
            if isinstance(m, SpectralNormLinear):
                m.weight.normal_().mul_(20)
    block.refresh(500)
    for m in block.g:
        if isinstance(m, SpectralNormLinear):
            assert float(torch.linalg.matrix_norm(m.weight, 2)) > 2.0
            assert float(torch.linalg.matrix_norm(m.effective_weight(), 2)) <= 0.75 * (1 + 1e-6)
    assert block.lipschitz_bound() <= 0.75**2 * (1 + 1e-6)
    # empirical: |g(a) - g(b)| <= Lip |a - b|
    a, b = torch.randn(500, 3, dtype=torch.float64), torch.randn(500, 3, dtype=torch.float64)
    with torch.no_grad():
        ratio = (block.g(a) - block.g(b)).norm(dim=-1) / (a - b).norm(dim=-1)
    assert ratio.max() <= 0.75**2 + 1e-6


def test_conditional_flow_inverts_and_its_logdet_is_the_x_jacobian():
    """With a context c: the log-det is that of d y / d x at fixed c, the inverse holds for each c, and the
    unrolled inverse's gradient d x / d y is (I + J)^-1."""
    torch.manual_seed(3)
    block = ResidualBlock(3, hidden=16, n_layers=3, coeff=0.9, context_dim=5, eval_estimator="exact").double().eval()
    block.refresh(300)
    x, c = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    y, logdet = block(x, c)
    ref = torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(
        lambda p, ci=ci: p + block.g_of(p[None], ci[None])[0], xi))[1] for xi, ci in zip(x, c)])
    torch.testing.assert_close(logdet, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(block.inverse(y, c), x, atol=1e-5, rtol=0)
    assert (block.inverse(y, torch.zeros_like(c)) - x).abs().max() > 1e-3  # the context matters
    yg = y[:1].clone().requires_grad_(True)
    xg = block.inverse(yg, c[:1], grad_steps=60)
    dxdy = torch.stack([torch.autograd.grad(xg[0, i], yg, retain_graph=True)[0][0] for i in range(3)])
    J = torch.autograd.functional.jacobian(lambda p: block.g_of(p[None], c[:1])[0], xg[0].detach())
    torch.testing.assert_close(dxdy, torch.linalg.inv(torch.eye(3, dtype=torch.float64) + J), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="context"):
        block(x)


def test_inverse_gradient_is_the_implicit_gradient():
    """The inverse flow's gradient (``inverse_grad="implicit"``) against central finite differences of the
    converged inverse (float64) for y, the context and g's weights, and d x / d y against the exact
    ``(I + J)^-1``; the old 5-step unrolled gradient is visibly off on this block (Lip(g) about 0.56)."""
    torch.manual_seed(4)
    block = _block(hidden=3, context_dim=2, coeff=0.75, inverse_atol=1e-13, inverse_iters=500).eval()
    y = torch.randn(5, 3, dtype=torch.float64) * 0.5
    c = torch.randn(5, 2, dtype=torch.float64)
    target = torch.randn(5, 3, dtype=torch.float64)
    weight = block.g[0].weight

    def loss(y, c):
        return ((block.inverse(y, c) - target) ** 2 * torch.arange(1.0, 4.0, dtype=torch.float64)).sum()

    yg, cg = y.clone().requires_grad_(True), c.clone().requires_grad_(True)
    grads = torch.autograd.grad(loss(yg, cg), [yg, cg, weight])

    def fd(tensor, eps=1e-6):
        out = torch.zeros_like(tensor)
        with torch.no_grad():
            for i in range(tensor.numel()):
                flat = tensor.view(-1)
                keep = float(flat[i])
                flat[i] = keep + eps
                up = float(loss(y, c))
                flat[i] = keep - eps
                down = float(loss(y, c))
                flat[i] = keep
                out.view(-1)[i] = (up - down) / (2 * eps)
        return out

    with torch.no_grad():
        refs = [fd(y), fd(c), fd(weight)]
    for got, ref in zip(grads, refs):
        assert ref.abs().max() > 1e-2  # a gradient worth checking
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    # d x / d y = (I + J)^-1 at the solution, point by point
    yg = y[:1].clone().requires_grad_(True)
    xg = block.inverse(yg, c[:1])
    dxdy = torch.stack([torch.autograd.grad(xg[0, i], yg, retain_graph=True)[0][0] for i in range(3)])
    J = torch.autograd.functional.jacobian(lambda p: block.g_of(p[None], c[:1])[0], xg[0].detach())
    torch.testing.assert_close(dxdy, torch.linalg.inv(torch.eye(3, dtype=torch.float64) + J), atol=1e-10, rtol=0)
    # the truncated gradient of before: relative error well above the implicit one's
    yg, cg = y.clone().requires_grad_(True), c.clone().requires_grad_(True)
    block.inverse_grad = "unrolled"
    old = torch.autograd.grad(loss(yg, cg), [yg, cg, weight])
    rel = max(float((o - r).norm() / r.norm()) for o, r in zip(old, refs))
    assert rel > 1e-3


def test_logdet_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="no_such"):
        ResidualBlock(3, estimator="no_such")


# ---------------------------------------------------------------------------------------------- metrics
from conftest import SHARED_DATA  # noqa: E402

from src.geometry.mesh_io import read_mesh, read_xyz  # noqa: E402
from src.geometry.pu_metrics import (cd_hd, closest_points_on_mesh, normalize_unit_sphere,  # noqa: E402
                                     point_triangle_distance)
from src.geometry.sampling import farthest_point_sample  # noqa: E402

PU_GAN = SHARED_DATA / "pu_gan" / "test"


def test_pu_cd_hd_on_hand_made_clouds():
    """Six points on the axes (already on the unit sphere) against the same plus the centre: forward squared
    distances are six 0 and one 1, backward all 0: CD = 1/7 (all of it prediction-to-truth), HD = 1 (raw; the benchmark prints x1e-3)."""
    gt = torch.cat([torch.eye(3), -torch.eye(3)]).double()
    pred = torch.cat([gt, torch.zeros(1, 3, dtype=torch.float64)])
    got = cd_hd(pred, gt)
    assert got["cd"] == pytest.approx(1 / 7) and got["hd"] == pytest.approx(1.0)
    assert got["cd_pred_to_gt"] == pytest.approx(1 / 7) and got["cd_gt_to_pred"] == 0.0  # the centre is the only miss
    # normalisation: scaling and moving a cloud changes nothing
    assert cd_hd(pred * 3 + 1, gt)["cd"] == pytest.approx(1 / 7)
    assert cd_hd(gt, gt) == {"cd": 0.0, "hd": 0.0, "cd_pred_to_gt": 0.0, "cd_gt_to_pred": 0.0}
    n, c, s = normalize_unit_sphere(pred * 3 + 1)
    assert n.norm(dim=-1).max() == pytest.approx(1.0) and float(s) == pytest.approx(3.0)


def test_pu_hd_sums_both_directions_as_pu_gans_evaluate_py():
    """Misses both ways: (1, 0, 0) lies 1 from the truth (squared), (0, 2, 0) lies 4 from the prediction. PU-GAN's
    released evaluate.py adds the two maxima: HD 5, not max 4."""
    pred = torch.tensor([[0.0, 0, 0], [1, 0, 0]], dtype=torch.float64)
    gt = torch.tensor([[0.0, 0, 0], [0, 2, 0]], dtype=torch.float64)
    got = cd_hd(pred, gt, normalize=False)
    assert got["hd"] == pytest.approx(5.0) and got["cd"] == pytest.approx(0.5 + 2.0)
    assert (got["cd_pred_to_gt"], got["cd_gt_to_pred"]) == (pytest.approx(0.5), pytest.approx(2.0))


def test_score_shape_with_a_ground_truth_made_once_scores_the_same():
    """Handing score_shape the mesh's ground truth (as bench/pu_inn.py does, once per shape) changes nothing."""
    from src.models.pu_inn.module import ground_truth, score_shape
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pred = ground_truth(verts, faces, 64, oversample=4) + 0.01 * noise
    assert score_shape(pred, verts, faces, gt=ground_truth(verts, faces, 64)) == score_shape(pred, verts, faces)


def test_emd_is_the_optimal_matching():
    """EMD against every one-to-one matching of 6 points (720 permutations); a shifted copy scores the shift;
    unequal sizes are refused."""
    import itertools

    from src.geometry.pu_metrics import emd_exact

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 3, generator=g).double(), torch.rand(6, 3, generator=g).double()
    d = torch.cdist(a, b)
    brute = min(float(d[torch.arange(6), list(p)].mean()) for p in itertools.permutations(range(6)))
    assert float(emd_exact(a[None], b[None])[0]) == pytest.approx(brute)
    assert brute > float(d.amin(1).mean()) + 1e-6  # a matching, not each point's nearest neighbour
    shift = torch.tensor([0.3, -0.4, 0.0], dtype=torch.float64)
    assert float(emd_exact(a[None], a[torch.randperm(6, generator=g)][None] + shift)[0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal size"):
        emd_exact(a[None], b[None, :5])


def test_point_to_triangle_distance_matches_a_dense_search():
    g = torch.Generator().manual_seed(0)
    verts = torch.rand(4, 3, generator=g, dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [1, 2, 3]])
    pts = torch.randn(300, 3, generator=g, dtype=torch.float64)
    u, v = torch.meshgrid(torch.linspace(0, 1, 400, dtype=torch.float64), torch.linspace(0, 1, 400, dtype=torch.float64),
                          indexing="ij")
    keep = (u + v) <= 1
    bary = torch.stack([1 - u[keep] - v[keep], u[keep], v[keep]], -1)
    dense = torch.cat([bary @ verts[f] for f in faces])
    ref = torch.cdist(pts, dense).amin(-1)
    got = point_triangle_distance(pts, verts, faces)
    assert (got <= ref + 1e-12).all()  # exact is never farther than a sampled point
    assert (ref - got).max() < 5e-3  # and the grid gets within its spacing
    assert point_triangle_distance(dense[::97], verts, faces).max() < 1e-9  # points on the mesh: 0
    near, dist = closest_points_on_mesh(pts, verts, faces)
    assert torch.allclose((near - pts).norm(dim=-1), got) and torch.equal(dist, got)  # the closest point is that far
    assert point_triangle_distance(near, verts, faces).max() < 1e-9  # and lies on the mesh
    # above the inside of a face: the foot of the perpendicular
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.3, 0.7], [2.0, 0.0, -1.0]], dtype=torch.float64)
    near, dist = closest_points_on_mesh(q, flat, torch.tensor([[0, 1, 2]]))
    assert torch.allclose(near, torch.tensor([[0.2, 0.3, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(dist, torch.tensor([0.7, 2.0 ** 0.5], dtype=torch.float64))


def test_farthest_point_sample_spreads_points():
    x = torch.cat([torch.zeros(50, 3), torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])])
    idx = farthest_point_sample(x, 4)
    assert set(idx.tolist()[1:]) == {50, 51, 52}


@pytest.mark.skipif(not (PU_GAN / "Icosahedron.off").is_file(), reason=f"PU-GAN test meshes not found at {PU_GAN}")
def test_pu_gan_test_files_load_and_inputs_lie_on_their_meshes():
    for name, n_v, n_f in (("Icosahedron", 2562, 5120), ("fandisk", 2731, 5458)):
        verts, faces = read_mesh(PU_GAN / f"{name}.off")
        pts = torch.from_numpy(read_xyz(PU_GAN / f"{name}.xyz"))
        assert verts.shape == (n_v, 3) and faces.shape == (n_f, 3) and pts.shape == (2048, 3)
        d = point_triangle_distance(pts[::8], torch.from_numpy(verts), torch.from_numpy(faces))
        assert d.max() < 1e-5  # the 2048-point inputs are samples of the mesh surface


def test_pu_files_bad_input_is_named(tmp_path):
    bad = tmp_path / "bad.off"
    bad.write_text("PLY\n")
    with pytest.raises(ValueError, match="bad.off"):
        read_mesh(bad)
    bad_xyz = tmp_path / "bad.xyz"
    bad_xyz.write_text("1 2\n3 4\n")
    with pytest.raises(ValueError, match="bad.xyz"):
        read_xyz(bad_xyz)


# ------------------------------------------------------------------------------------------------- data
def test_generated_pu_dataset_in_the_pu_gan_layout(tmp_path):
    import h5py

    from src.data.point_patches import load_test_shapes
    from src.data.pu_gan import PUPatches, write_pu_dataset

    root = write_pu_dataset(tmp_path / "pu", n_meshes=4, patches_per_mesh=3, n_test=1, seed=0)
    with h5py.File(root / "train" / "pu_patches.h5") as f:
        assert f["poisson_256"].shape == (12, 256, 3) and f["poisson_1024"].shape == (12, 1024, 3)
        raw_sparse, raw_dense = torch.from_numpy(f["poisson_256"][0]), torch.from_numpy(f["poisson_1024"][0])
    # the sparse input is a subset of its dense target
    assert torch.cdist(raw_sparse.double(), raw_dense.double()).amin(-1).max() < 1e-6
    ds = PUPatches(root / "train" / "pu_patches.h5")
    item = ds[0]
    assert item["dense"].norm(dim=-1).max() == pytest.approx(1.0, abs=1e-5)
    assert item["dense"].mean(0).abs().max() < 1e-5
    # the same normalisation maps the input: it stays a subset of the target
    assert torch.cdist(item["sparse"].double(), item["dense"].double()).amin(-1).max() < 1e-5
    aug = PUPatches(root / "train" / "pu_patches.h5", augment=True)[0]
    assert torch.cdist(aug["sparse"].double(), aug["dense"].double()).amin(-1).max() < 0.03  # jitter is clipped at 0.015 per axis
    (shape,) = load_test_shapes(root / "test")
    assert shape["input"].shape == (2048, 3)
    d = point_triangle_distance(shape["input"][::16].double(), torch.from_numpy(shape["verts"]), torch.from_numpy(shape["faces"]))
    assert d.max() < 1e-5


def test_pu_patches_bad_file_is_named(tmp_path):
    import h5py

    from src.data.blender import DataError
    from src.data.pu_gan import PUPatches

    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("poisson_256", data=torch.zeros(2, 256, 3).numpy())
    with pytest.raises(DataError, match=r"bad.h5.*poisson_1024"):
        PUPatches(path)
    with pytest.raises(DataError, match="missing.h5"):
        PUPatches(tmp_path / "missing.h5")


# ---------------------------------------------------------------------------------- losses and test protocol
def _plane_clouds(n_side: int = 32) -> dict[str, torch.Tensor]:
    """Three 1024-point clouds on the square [-0.7, 0.7]^2 of the plane z = 0: a grid, uniform random points, and
    points clustered around 16 centres."""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(-0.7, 0.7, n_side)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    rand = torch.rand(n_side**2, 2, generator=g) * 1.4 - 0.7
    centres = torch.rand(16, 2, generator=g) * 1.2 - 0.6
    clustered = (centres.repeat_interleave(n_side**2 // 16, 0) + 0.04 * torch.randn(n_side**2, 2, generator=g))
    return {k: torch.cat([v, torch.zeros(len(v), 1)], -1)[None] for k, v in
            {"grid": grid, "random": rand, "clustered": clustered}.items()}


def test_uniform_loss_orders_even_random_clustered():
    """PU-GAN's uniform term ranks a grid < uniform random < clustered points (seen 0.0031 / 0.0141 / 0.0245).
    (It scores balls around farthest-point seeds only; descending it alone does not even a cloud out, so it is a
    regulariser beside the Chamfer term, as PU-GAN uses it.)"""
    from src.models.pu_inn.losses import uniform_loss

    loss = {k: float(uniform_loss(v)) for k, v in _plane_clouds().items()}
    assert loss["grid"] < 0.5 * loss["random"] and loss["random"] < 0.8 * loss["clustered"], loss


def test_repulsion_loss_pushes_close_points_apart():
    """PU-Net's repulsion: its gradient moves two points 0.01 apart (closer than h = 0.03) away from each other,
    and a pair farther than its 0.07 ball feels nothing."""
    from src.models.pu_inn.losses import repulsion_loss

    for gap, pushes in ((0.01, True), (0.1, False)):
        x = torch.tensor([[[0.0, 0, 0], [gap, 0, 0]]], requires_grad=True)
        repulsion_loss(x, k=1).backward()
        moved_apart = float(x.grad[0, 0, 0]) > 0 and float(x.grad[0, 1, 0]) < 0  # descent: x0 left, x1 right
        assert moved_apart is pushes and (pushes or float(x.grad.abs().max()) == 0), (gap, x.grad)


def test_surface_loss_is_the_distance_off_the_tangent_plane():
    """The surface term: a point slid along a plane costs nothing, a point lifted off it by h costs h^2 and its
    gradient points back along the normal only (what Chamfer's point-to-point half does not give: it also pulls
    along the surface towards one sample); with no normals given, the plane fitted to the target's neighbours
    gives the same on a plane."""
    from src.models.pu_inn.losses import surface_loss

    g = torch.Generator().manual_seed(0)
    target = torch.cat([torch.rand(1, 400, 2, generator=g) * 2 - 1, torch.zeros(1, 400, 1)], -1)  # the z = 0 plane
    normals = torch.tensor([0.0, 0, 1]).expand(1, 400, 3)
    slid = torch.cat([torch.rand(1, 50, 2, generator=g) * 1.6 - 0.8, torch.zeros(1, 50, 1)], -1)
    assert float(surface_loss(slid, target, normals)) == 0.0
    lifted = (slid + torch.tensor([0.0, 0, 0.03])).requires_grad_(True)
    loss = surface_loss(lifted, target, normals)
    assert float(loss) == pytest.approx(0.03**2, rel=1e-4)
    loss.backward()
    assert float(lifted.grad[..., :2].abs().max()) == 0.0 and bool((lifted.grad[..., 2] > 0).all())
    assert float(surface_loss(lifted.detach(), target)) == pytest.approx(0.03**2, rel=1e-3)  # fitted planes


class _CollapsingUpsampler(torch.nn.Module):
    """A stand-in network: every output point of a patch at its centroid, plus one point far outside."""
    up_ratio = 4

    def forward(self, x):
        out = x.mean(1, keepdim=True).expand(-1, 4 * x.shape[1], -1).clone()
        out[:, 0] = 50.0
        return {"dense": out}


def test_test_protocol_merges_the_input_and_removes_outliers():
    """``upsample_shape``: PU-Flow's ``merge_input`` puts the input points into the result (a collapsing network
    alone cannot), and ``outlier_std`` drops the far points that the default keeps."""
    from src.models.pu_inn.module import upsample_shape

    pts = _plane_clouds()["random"][0]
    net = _CollapsingUpsampler()

    def share_of_inputs_kept(out):
        return float((torch.cdist(pts, out).amin(-1) < 1e-5).float().mean())

    plain = upsample_shape(net, pts)
    merged = upsample_shape(net, pts, patch_ratio=4, merge_input=True)
    assert share_of_inputs_kept(plain) < 0.05 and share_of_inputs_kept(merged) > 0.9
    assert plain.norm(dim=-1).max() > 10  # PU-GAN's protocol keeps an outlier
    cleaned = upsample_shape(net, pts, merge_input=True, outlier_std=3.0)
    assert cleaned.norm(dim=-1).max() < 2 and cleaned.shape[0] <= 4 * pts.shape[0]


@pytest.mark.parametrize("interp", ["point", "pair"])
def test_interpolation_is_convex_and_more_up_keeps_the_spread_candidates(interp):
    """With no flow blocks (latent = xyz) every new point is a convex combination of its point's k nearest
    neighbours: inside their bounding box, and ``flow_offset`` is 0. ``more_up`` makes (r + more_up) N candidates
    and keeps r N of them by farthest-point sampling: a subset, spread wider than the first r N candidates. A bad
    ``more_up`` or head is named."""
    from src.models.pu_inn.network import PUINN, gather, knn

    torch.manual_seed(0)
    sparse = torch.rand(2, 64, 3)
    sparse[..., 2] *= 0.05
    for more_up in (0, 2):
        net = PUINN(k=8, feat_dim=16, n_blocks=0, interp=interp, more_up=more_up)
        with torch.no_grad():
            net.interp[-1].weight.normal_()  # weights far from the start, so the test does not pass by the prior
            out = net(sparse)
        dense = out["dense"]
        assert dense.shape == (2, 4 * 64, 3)
        assert out["flow_offset"].shape == (2, 64, 4 + more_up) and out["flow_offset"].abs().max() < 1e-5
        nb = gather(sparse, knn(sparse, 8))  # (B, N, k, 3)
        lo, hi = nb.amin(2), nb.amax(2)
        cands = out.get("candidates", dense).reshape(2, 64, 4 + more_up, 3)
        assert ((cands >= lo[:, :, None] - 1e-6) & (cands <= hi[:, :, None] + 1e-6)).all()
        if more_up:
            assert out["candidates"].shape == (2, 6 * 64, 3)
            assert ((dense[:, :, None] - out["candidates"][:, None]).abs().amax(-1).amin(-1) == 0).all()  # a subset

            def spacing(c):
                return (c[:, :, None] - c[:, None]).norm(dim=-1).add(torch.eye(c.shape[1]) * 1e9).amin(-1).mean()

            assert spacing(dense) > 1.2 * spacing(out["candidates"][:, : 4 * 64])
    with pytest.raises(ValueError, match="more_up"):
        PUINN(k=8, more_up=5)
    for key in ("interp", "decode_context", "features"):
        with pytest.raises(ValueError, match=key):
            PUINN(**{key: "nearest"})


def _curved_patch(n: int, seed: int) -> torch.Tensor:
    """(1, n, 3) float64 points of a saddle in its unit sphere, random (clumps and holes, as PU-GAN's inputs)."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.rand(2, n, generator=g, dtype=torch.float64) * 2 - 1
    pts = torch.stack([u, v, 0.4 * (u**2 - v**2)], -1)
    return (pts / pts.norm(dim=-1).max())[None]


def _flow_params(net) -> list[torch.Tensor]:
    return [p for block in net.blocks for p in block.parameters()]


@pytest.mark.parametrize("n_layers", [1, 2])
def test_cd_reaches_the_flow_when_new_points_are_decoded_with_the_parent_context(n_layers):
    """The reconstruction loss reaches the flow's parameters to first order when each new point is decoded with its
    parent's context (``decode_context=parent``): the gradient of CD with respect to them is non-zero and equals
    central finite differences of the converged network (float64). Decoded with the weights' mix of the
    neighbours' contexts (``mixed``, the earlier design) an affine flow (one linear map per block) cancels exactly:
    the new points are the convex mixes of the neighbours whatever the flow's parameters, and CD's gradient with
    respect to them is zero."""
    from src.geometry.knn import chamfer
    from src.models.pu_inn.network import PUINN

    sparse, target = _curved_patch(24, 0), _curved_patch(96, 1)

    def make(decode_context):
        torch.manual_seed(0)
        net = PUINN(k=6, feat_dim=6, feat_layers=2, n_blocks=2, hidden=8, n_layers=n_layers, coeff=0.9,
                    flow_init_gain=1.0, decode_context=decode_context).double().eval()
        for block in net.blocks:
            block.inverse_atol, block.inverse_iters, block.newton_iters = 1e-14, 1000, 50
        return net

    def cd(net):
        return chamfer(net(sparse)["dense"], target).sum()

    parent, mixed = make("parent"), make("mixed")
    g_parent = torch.autograd.grad(cd(parent), _flow_params(parent))
    g_mixed = torch.autograd.grad(cd(mixed), _flow_params(mixed), allow_unused=True)
    norm = lambda gs: sum(float(g.norm()) ** 2 for g in gs if g is not None) ** 0.5  # noqa: E731
    with torch.no_grad():
        loss = float(cd(parent))
    assert norm(g_parent) > 1e-3 * loss, (norm(g_parent), loss)  # a gradient of the size of the loss's
    if n_layers == 1:  # affine blocks: the mixed decode cancels the flow
        assert norm(g_mixed) < 1e-9 * norm(g_parent)
        with torch.no_grad():
            assert float(mixed(sparse)["flow_offset"].max()) < 1e-9
            assert float(parent(sparse)["flow_offset"].median()) > 1e-3
    # finite differences on the first block's last map (weight and bias) and one LipSwish slope
    block = parent.blocks[0]
    names = [n for n, _ in block.named_parameters()]
    checked = [(name, p, g) for (name, p), g in zip(block.named_parameters(), g_parent[: len(names)])
               if name.startswith(f"g.{len(block.g) - 1}.") or name.endswith("raw_beta")]
    assert checked
    for name, param, grad in checked:
        ref = torch.zeros_like(param)
        with torch.no_grad():
            for i in range(param.numel()):
                flat, keep = param.view(-1), float(param.view(-1)[i])
                flat[i] = keep + 1e-6
                up = float(cd(parent))
                flat[i] = keep - 1e-6
                down = float(cd(parent))
                flat[i] = keep
                ref.view(-1)[i] = (up - down) / 2e-6
        torch.testing.assert_close(grad, ref, atol=1e-7, rtol=1e-5, msg=name)


def _outside_neighbour_hull(points: torch.Tensor, sparse: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, S) bool: new points (B, N, S, 3) of each input point that are provably outside the convex hull of its
    k nearest inputs: beyond all of them along the neighbours' least principal direction (their normal)."""
    from src.models.pu_inn.network import gather, knn

    nb = gather(sparse, knn(sparse, k))  # (B, N, k, 3)
    centre = nb.mean(2, keepdim=True)
    normal = torch.linalg.eigh(((nb - centre).transpose(2, 3) @ (nb - centre)))[1][..., 0]  # (B, N, 3)
    h_nb = ((nb - centre) * normal[:, :, None]).sum(-1)  # (B, N, k)
    h = ((points - centre) * normal[:, :, None]).sum(-1)  # (B, N, S)
    return (h > h_nb.amax(-1, keepdim=True) + 1e-6) | (h < h_nb.amin(-1, keepdim=True) - 1e-6)


def test_outside_neighbour_hull_finds_points_off_a_plane():
    """The helper of the flow-offset check: points on a patch's plane inside its span are not flagged, points
    lifted off the plane are."""
    g = torch.Generator().manual_seed(0)
    sparse = torch.cat([torch.rand(1, 64, 2, generator=g), torch.zeros(1, 64, 1)], -1)
    inside = sparse[:, :, None].clone().expand(-1, -1, 2, -1).clone()
    lifted = inside + torch.tensor([0.0, 0.0, 0.01])
    assert not _outside_neighbour_hull(inside, sparse, 8).any()
    assert _outside_neighbour_hull(lifted, sparse, 8).all()


# -------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_pu_inn_smoke_lowers_cd_and_memory_stays_flat(make_cfg, tmp_path):
    """``experiment=pu_inn_smoke`` (200 steps on generated patches, memory callback on): the val patches'
    CD falls below the untrained network's (which already interpolates between neighbours), test/cd and
    test/hd are written, no memory growth."""
    from hydra.utils import instantiate

    from src.geometry.knn import chamfer
    from src.pipeline import run

    cfg = make_cfg("experiment=pu_inn_smoke", "callbacks=all", out=tmp_path / "run")
    metrics = run(cfg)
    from tests.conftest import assert_instruments

    assert_instruments(tmp_path / "run", metrics, {
        "train": {"features", "flow.forward", "interpolate", "flow.inverse", "loss", "backward", "optimizer"},
        "val": {"flow.forward", "interpolate", "flow.inverse", "logdet", "nll"}})
    for key in ("test/cd", "test/hd", "test/emd", "test/p2f", "val/cd", "val/nll"):
        assert key in metrics and math.isfinite(metrics[key]), key
    torch.manual_seed(cfg.seed)
    init = instantiate(cfg.model, _convert_="all")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    with torch.no_grad():
        before = torch.cat([chamfer(init.net(b["sparse"])["dense"], b["dense"]) for b in dm.val_dataloader()]).mean()
    assert metrics["val/cd"] < 0.85 * float(before), (metrics["val/cd"], float(before))  # seen: 1.35e-3 vs 1.80e-3
    # the trained flow moves the new points off the convex mixes of their neighbours: val/flow_offset is logged, and
    # the decoded points (before any xyz refinement) leave the convex hull of their parent's neighbours
    trained = type(init).load_from_checkpoint(tmp_path / "run" / "checkpoints" / "final.ckpt", map_location="cpu").eval()
    assert metrics["val/flow_offset"] > 0.05, metrics["val/flow_offset"]
    trained.net.refine = None
    sparse = next(iter(dm.val_dataloader()))["sparse"]
    with torch.no_grad():
        out = trained.net(sparse)
    cands = out.get("candidates", out["dense"]).reshape(*sparse.shape[:2], trained.net.n_sets, 3)
    outside = _outside_neighbour_hull(cands, sparse, trained.net.k)
    assert float(outside.float().mean()) > 0.05, float(outside.float().mean())
    assert metrics["memory/leak_found"] is False
    assert (tmp_path / "run" / "test_points").is_dir()
    per_shape = json.loads((tmp_path / "run" / "test_scores.json").read_text())
    assert len(per_shape) == 2 and all(s["n_output"] == 4 * s["n_input"] == 2048 for s in per_shape)
    assert metrics["test/cd"] == pytest.approx(sum(s["test/cd"] for s in per_shape) / 2, rel=1e-6)  # both x1e-3
    assert "test/lpips" not in metrics and not any(k.startswith("kernels/") for k in metrics)
    # eval.py scores the checkpoint on a test folder alone: no training data is read (the training file is gone)
    from tests.conftest import assert_same_test_metrics, evaluate_run

    test_root = tmp_path / "tests_only"
    shutil.copytree(Path(cfg.data.root) / "test", test_root)
    evaluated = evaluate_run(tmp_path / "run", tmp_path / "eval", "data.root=" + str(tmp_path / "no_such_root"),
                             "data.generate=null", f"data.test_root={test_root}")
    assert_same_test_metrics(metrics, evaluated)
    assert len(json.loads((tmp_path / "eval" / "test_scores.json").read_text())) == 2


def test_the_preset_candidates_reach_the_gaps_of_a_non_uniform_input(make_cfg):
    """``experiment=pu_inn_meshes_cpu``'s network (``net.more_up`` 12: 16 candidates a point, farthest-point
    sampled to 4) covers the gaps of a random 256-point subset of an even 1024-point patch already at its
    initialisation, better than 4 candidates a point (``more_up`` 0) and far better than the input: the
    target->prediction half of CD (coverage) is below 0.8x the one and 0.4x the other, and the accuracy half (mean
    squared distance to the targets) stays under a quarter of the inputs' mean squared nearest-neighbour distance."""
    from src.geometry.knn import knn_points
    from src.geometry.pu_metrics import cd_hd
    from src.models.pu_inn.network import PUINN

    net_cfg = dict(make_cfg("experiment=pu_inn_meshes_cpu").model.net)
    assert net_cfg["more_up"] == 12
    g = torch.Generator().manual_seed(0)
    u, v = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    dense = torch.stack([u, v, 0.3 * (u**2 - v**2)], -1).reshape(1, -1, 3)  # an even saddle patch
    dense = dense + 0.01 * torch.randn(dense.shape, generator=g)
    dense = dense / dense.norm(dim=-1).max()  # the unit-sphere frame patches are upsampled in
    sparse = dense[:, torch.randperm(1024, generator=g)[:256]]  # random: clumps and holes, as PU-GAN's inputs

    def halves(pred):  # (accuracy, coverage) in the patch's own frame
        h = cd_hd(pred[0], dense[0], normalize=False)
        return h["cd_pred_to_gt"], h["cd_gt_to_pred"]

    out = {}
    for more_up in (0, 12):
        torch.manual_seed(0)
        with torch.no_grad():
            out[more_up] = halves(PUINN(**{**net_cfg, "more_up": more_up}).eval()(sparse)["dense"])
    inp = halves(sparse)
    spacing = float(knn_points(sparse, sparse, 2)[0][..., 1].mean())  # squared nearest-input distance
    assert out[12][1] < 0.8 * out[0][1] and out[12][1] < 0.4 * inp[1], (inp, out)  # seen: 0.93e-3, 1.30e-3, 2.84e-3
    assert out[12][0] < 0.25 * spacing, (out, spacing)
