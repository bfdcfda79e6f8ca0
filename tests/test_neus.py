"""NeuS: the camera decomposition, the NeuS-layout loader's ray convention (generated and real DTU), the
renderer on an analytic SDF, marching cubes and the mesh metrics, and a short run that improves its mesh."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from src.data.blender import DataError
from src.data.datamodule import NeuSDataModule
from src.data.generate import NEUS_SCALE, write_neus
from src.data.neus import GL_FROM_CV, decompose_projection, load_neus
from src.data.scene import default_scene
from src.geometry import chamfer_fscore, extract_mesh, read_mesh, sample_surface, write_mesh
from src.geometry.meshing import export_mesh, mesh_metrics
from src.models.neus import NeuSModule
from src.models.neus.network import SDFNetwork
from src.pipeline import run
from src.render.rays import get_rays

from conftest import SHARED_DATA, assert_instruments

DTU = SHARED_DATA / "dtu_scan24_half"
needs_dtu = pytest.mark.skipif(not (DTU / "cameras_sphere.npz").is_file(), reason=f"real DTU scan24 not found at {DTU}")


@pytest.fixture(scope="module")
def neus_scene(data_dir):
    return write_neus(data_dir / "neus_test", image_size=32, n_views=12, supersample=2)


def _projection_from_loaded(K_gl: torch.Tensor, c2w_gl: torch.Tensor) -> np.ndarray:
    """P = K [R | t] of the OpenCV camera (pixel centres at integers) that the loaded GL camera stands for."""
    K = K_gl.double().numpy().copy()
    K[:2, 2] -= 0.5
    w2c = np.linalg.inv(c2w_gl.double().numpy() @ GL_FROM_CV)
    return K @ w2c[:3]


def _same_up_to_scale(P: np.ndarray, Q: np.ndarray) -> float:
    P, Q = P / np.linalg.norm(P[2, :3]), Q / np.linalg.norm(Q[2, :3])
    P, Q = P * np.sign(P[2, 3] or 1), Q * np.sign(Q[2, 3] or 1)
    return float(np.abs(P - Q).max() / np.abs(P).max())


def test_neus_decomposition_reproduces_a_projection_with_skew():
    rng = np.random.default_rng(0)
    for _ in range(5):
        K = np.array([[800.0, 3.5, 390.0], [0.0, 780.0, 300.0], [0.0, 0.0, 1.0]])
        A = rng.normal(size=(3, 3))
        R, _ = np.linalg.qr(A)
        R = R * np.sign(np.linalg.det(R))  # a proper rotation
        C = rng.normal(size=3) * 3
        P = 2.7 * K @ np.concatenate([R, -R @ C[:, None]], 1)
        K2, pose = decompose_projection(P)
        np.testing.assert_allclose(K2, K, rtol=1e-9, atol=1e-7)
        np.testing.assert_allclose(pose[:3, :3], R.T, atol=1e-9)
        np.testing.assert_allclose(pose[:3, 3], C, atol=1e-9)


def test_neus_loader_reproduces_the_projection_matrices(neus_scene):
    cams = np.load(neus_scene / "cameras_sphere.npz")
    views = load_neus(neus_scene)["views"]
    for i in range(len(views)):
        P = (cams[f"world_mat_{i}"] @ cams[f"scale_mat_{i}"])[:3]
        assert _same_up_to_scale(P, _projection_from_loaded(views.K[i], views.c2w[i])) < 1e-5


@pytest.mark.parametrize("downscale", [1, 2])
def test_neus_loader_rays_cut_out_the_mask(data_dir, downscale):
    """Rays of every pixel, built from the loaded cameras and taken back to world units, hit the exact
    scene precisely on the mask (up to anti-aliased boundary pixels); half a pixel off would show."""
    root = write_neus(data_dir / "neus_test64", image_size=64, n_views=6, supersample=2)
    scene = load_neus(root, downscale)
    views, S = scene["views"], scene["scale_mat"]
    assert float(S[0, 0]) == NEUS_SCALE
    world = default_scene().sample_surface(4000, seed=3)
    assert ((world - S[:3, 3]) / S[0, 0]).norm(dim=-1).max() < 1.0  # the scene lies inside the unit sphere

    def mismatch(shift: float) -> float:
        wrong = area = 0
        for i in range(len(views)):
            K = views.K[i].double().clone()
            K[0, 2] += shift
            rays_o, rays_d = get_rays(*views.hw, K, views.c2w[i].double())
            rays_o = rays_o.reshape(-1, 3) @ S[:3, :3].T + S[:3, 3]  # normalised -> world
            hit = torch.isfinite(default_scene().intersect(rays_o, rays_d.reshape(-1, 3))["t"]).reshape(views.hw)
            mask = views.mask[i] > 0.5
            wrong, area = wrong + int((hit != mask).sum()), area + int(mask.sum())
        return wrong / area

    exact = mismatch(0.0)
    assert exact < (0.04 if downscale == 1 else 0.11), exact
    assert mismatch(0.5) > 1.5 * exact


@needs_dtu
def test_neus_loader_on_real_dtu_scan24():
    """The real scene: every decomposed camera reproduces its projection matrix, the principal point lands at
    the image centre in this project's pixel convention (also after downscaling), and every camera looks at
    the centre of the normalised space."""
    cams = np.load(DTU / "cameras_sphere.npz")
    full = load_neus(DTU)["views"]
    small = load_neus(DTU, downscale=4)["views"]
    assert len(full) == 35 and full.hw == (600, 800) and small.hw == (150, 200)
    for views in (full, small):
        h, w = views.hw
        assert (views.K[:, 0, 2] - w / 2).abs().max() < 0.5 and (views.K[:, 1, 2] - h / 2).abs().max() < 0.5
    for i in range(35):
        P = (cams[f"world_mat_{i}"] @ cams[f"scale_mat_{i}"])[:3]
        assert _same_up_to_scale(P, _projection_from_loaded(full.K[i], full.c2w[i])) < 1e-5
        forward = -full.c2w[i][:3, 2]
        assert float(forward @ torch.nn.functional.normalize(-full.c2w[i][:3, 3], dim=0)) > 0.99


def test_neus_loader_errors_name_the_file_and_key(neus_scene, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(neus_scene, bad)
    cams = dict(np.load(bad / "cameras_sphere.npz"))
    del cams["scale_mat_3"]
    np.savez(bad / "cameras_sphere.npz", **cams)
    with pytest.raises(DataError, match=r"cameras_sphere.npz.*'scale_mat_3'"):
        load_neus(bad)
    (bad / "cameras_sphere.npz").unlink()
    with pytest.raises(DataError, match="cameras_sphere.npz"):
        load_neus(bad)
    (bad / "scene.json").unlink()  # now it looks like real data
    with pytest.raises(DataError, match="refusing to generate"):  # never overwrites real data
        NeuSDataModule(str(bad), generate={"image_size": 16, "n_views": 2}).prepare_data()
    assert (bad / "image").is_dir()


class _SphereSDF(torch.nn.Module):
    """An exact sphere SDF with a zero feature vector, in place of the SDF network."""

    def __init__(self, radius: float, d_feature: int) -> None:
        super().__init__()
        self.radius, self.d_feature = radius, d_feature

    def forward(self, x):
        return torch.cat([x.norm(dim=-1, keepdim=True) - self.radius, x.new_zeros(len(x), self.d_feature)], -1)

    sdf = SDFNetwork.sdf
    sdf_and_gradient = SDFNetwork.sdf_and_gradient


def test_neus_renderer_on_an_analytic_sphere_is_opaque_exactly_on_the_sphere():
    model = NeuSModule(n_samples=64, n_importance=64, up_sample_steps=4, variance_init=0.8, mask_weight=0.0,
                       sdf={"d_out": 9, "d_hidden": 8, "n_layers": 2, "skip_in": []},
                       rendering={"d_feature": 8, "d_hidden": 8, "n_layers": 1}).eval()
    model.sdf_net = _SphereSDF(0.5, 8)
    c2w = torch.eye(4)
    c2w[2, 3] = 3.0  # looking down -z at the origin from z = 3
    K = torch.tensor([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]])
    rays_o, rays_d = get_rays(32, 32, K, c2w)
    with torch.no_grad():
        out = model.render_image(rays_o, rays_d)
    d = torch.nn.functional.normalize(rays_d, dim=-1)
    closest = (rays_o - (rays_o * d).sum(-1, keepdim=True) * d).norm(dim=-1)
    hit, miss = closest < 0.5 - 0.03, closest > 0.5 + 0.03
    assert hit.sum() > 100 and miss.sum() > 100
    assert out["acc"][hit].min() > 0.99
    assert out["acc"][miss].max() < 0.01
    # depth: the first intersection along the unit direction
    b = (rays_o * d).sum(-1)
    t_hit = -b - (b**2 - (rays_o**2).sum(-1) + 0.25).clamp(min=0).sqrt()
    assert (out["depth"][hit] - t_hit[hit]).abs().max() < 0.02
    # normals: the sphere's outward normal at the hit point
    n_true = torch.nn.functional.normalize(rays_o + d * t_hit[..., None], dim=-1)
    cos = (torch.nn.functional.normalize(out["normal"][hit], dim=-1) * n_true[hit]).sum(-1)
    assert cos.min() > 0.99


def test_neus_sdf_geometric_init_is_a_sphere_of_radius_bias():
    """Geometric initialisation: the zero level set starts near the sphere of radius ``bias``, the SDF growing
    outwards with a slope near 1 (softplus offsets make it approximate, as in NeuS)."""
    torch.manual_seed(0)
    net = SDFNetwork(bias=0.5)
    dirs = torch.nn.functional.normalize(torch.randn(1000, 3), dim=-1)
    with torch.no_grad():
        inner, outer, far = net.sdf(dirs * 0.35), net.sdf(dirs * 0.65), net.sdf(dirs * 1.5)
    assert (inner < 0).float().mean() > 0.95 and (outer > 0).float().mean() > 0.95
    slope = float((far - outer).mean() / 0.85)
    assert 0.7 < slope < 1.3, slope


def test_marching_cubes_of_an_analytic_sdf_has_chamfer_near_zero(tmp_path):
    scene = default_scene()
    gt = scene.sample_surface(20000, seed=0)
    verts, faces = extract_mesh(lambda p: scene.sdf(p).float(), (-1.2,) * 3, (1.2,) * 3, 128, block=48)
    path = write_mesh(tmp_path / "scene.ply", verts, faces)
    v2, f2 = read_mesh(path)
    np.testing.assert_allclose(v2, verts, atol=1e-6)
    np.testing.assert_array_equal(f2, faces)
    good = mesh_metrics(verts, faces, gt, 20000, threshold=0.02)
    # point-to-point Chamfer has a floor set by the sample spacing: that of a second exact sample of the surface
    floor = chamfer_fscore(scene.sample_surface(20000, seed=5), gt, 0.02)["chamfer"]
    assert good["chamfer"] < 1.15 * floor and good["fscore"] > 0.95, (good, floor)
    # the metric sees a wrong surface: the same scene grown by 0.05 is about 0.05 away
    v3, f3 = extract_mesh(lambda p: scene.sdf(p).float() - 0.05, (-1.3,) * 3, (1.3,) * 3, 128)
    bad = mesh_metrics(v3, f3, gt, 20000, threshold=0.02)
    assert 0.04 < bad["accuracy"] < 0.06 and bad["fscore"] < 0.1, bad


def test_chamfer_fscore_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(300, 3, generator=g), torch.rand(200, 3, generator=g)
    d = torch.cdist(a.double(), b.double())
    got = chamfer_fscore(a, b, threshold=0.1)
    assert math.isclose(got["accuracy"], float(d.amin(1).mean()), rel_tol=1e-9)
    assert math.isclose(got["completeness"], float(d.amin(0).mean()), rel_tol=1e-9)
    p, r = float((d.amin(1) < 0.1).double().mean()), float((d.amin(0) < 0.1).double().mean())
    assert math.isclose(got["fscore"], 2 * p * r / (p + r), rel_tol=1e-9)
    pts = sample_surface(np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 2]]), 1000)
    assert (pts[:, 2] == 0).all() and (pts[:, :2] >= 0).all() and (pts[:, 0] + pts[:, 1] <= 1 + 1e-12).all()


@pytest.mark.slow
def test_neus_smoke_run_improves_its_mesh(make_cfg, tmp_path):
    """The generated scene: the trained SDF's mesh is much closer to the exact surface than the initial sphere."""
    cfg = make_cfg("experiment=neus_smoke", "model.end_iter=300", "trainer.val_check_interval=300",
                   "callbacks=all", "callbacks.mesh.n_points=20000", "data.gt_points=20000", out=tmp_path / "run")
    metrics = run(cfg)
    out = tmp_path / "run"
    assert_instruments(out, metrics, {"train": {"sample", "sdf", "colour", "composite", "eikonal", "loss", "backward",
                                                "optimizer"}, "val": {"sdf", "colour", "composite", "metrics"}})
    assert (out / "mesh.ply").is_file() and json.loads((out / "metrics.json").read_text())["mesh/chamfer"] > 0
    from hydra.utils import instantiate

    torch.manual_seed(cfg.seed)
    init = instantiate(cfg.model, _convert_="all")
    dm = instantiate(cfg.data)
    dm.setup("test")
    verts, faces = export_mesh(init, dm, tmp_path / "init.ply", 64)
    before = mesh_metrics(verts, faces, dm.gt_surface(), 20000, 0.02)
    assert metrics["mesh/chamfer"] < 0.6 * before["chamfer"], (metrics["mesh/chamfer"], before["chamfer"])
    assert metrics["mesh/fscore"] > 2 * before["fscore"], (metrics["mesh/fscore"], before["fscore"])
    assert metrics["test/psnr"] > 18.0
    assert metrics["data/test_split"] == "test (held-out views)"
    # eval.py on its checkpoint: the same test scores and mesh (test + orbit video, render=both)
    from src.render.video import read_video_frames
    from tests.conftest import assert_same_test_metrics, evaluate_run

    evaluated = evaluate_run(out, tmp_path / "eval", "model.render_path_frames=2", render="both")
    assert_same_test_metrics(metrics, evaluated)
    assert evaluated["mesh/chamfer"] == pytest.approx(metrics["mesh/chamfer"], rel=1e-6)
    frames, (w, h), _ = read_video_frames(tmp_path / "eval" / "render_path.mp4")
    assert len(frames) == 2 and w == 2 * h
