"""Proto-Depth: the vectorised mesh transform against the looped reference, Euler angles against scipy
(and pytorch3d where installed), KNN Chamfer against all pairs, surface sampling, the depth loader's
conventions and errors, and a short training that lowers the Chamfer."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.blender import DataError
from src.data.depth import DepthDataModule, depth_to_points, write_depth_scenes
from src.geometry.camera import intrinsics_matrix, project_points
from src.geometry.knn import chamfer, knn_points, knn_points_dense
from src.geometry.mesh import icosphere
from src.geometry.rotation import euler_angles_to_matrix
from src.geometry.sampling import sample_points
from src.models.proto_depth.losses import hybrid_chamfer
from src.models.proto_depth.network import Prototypes, transform_meshes, transform_meshes_looped

HAS_P3D = importlib.util.find_spec("pytorch3d") is not None


def _slots(b=2, k=3, p=4, level=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    sphere = torch.from_numpy(icosphere(level, prefer_pytorch3d=True)[0])
    verts = sphere[None] + 0.1 * torch.randn(p, sphere.shape[0], 3, generator=g).double()
    scale = (0.2 + torch.rand(b, k, 3, generator=g)).double()
    euler = (torch.rand(b, k, 3, generator=g) * 2 - 1).double() * math.pi
    trans = torch.randn(b, k, 3, generator=g).double()
    return [t.requires_grad_() for t in (verts, scale, euler, trans)]


# ----------------------------------------------------------------------------------------- transform
def test_vectorised_transform_equals_the_looped_reference_in_values_and_gradients():
    args = _slots()
    fast, slow = transform_meshes(*args), transform_meshes_looped(*args)
    assert fast.shape == (2, 3, 4, 42, 3)
    torch.testing.assert_close(fast, slow)
    w = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * w).sum(), args)
    g_slow = torch.autograd.grad((slow * w).sum(), args)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


def test_transform_places_a_prototype_as_rotate_scale_translate():
    """A unit x-axis vertex, scaled by 2 on x, turned 90 degrees about Z, moved by t: lands on (0, 2, 0) + t."""
    verts = torch.tensor([[[1.0, 0.0, 0.0]]])
    out = transform_meshes(verts, torch.tensor([[[2.0, 1.0, 1.0]]]), torch.tensor([[[0.0, 0.0, math.pi / 2]]]),
                           torch.tensor([[[0.5, 0.0, -1.0]]]))
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor([0.5, 2.0, -1.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("convention", ["XYZ", "ZYX", "XZY", "ZXZ"])
def test_euler_to_matrix_matches_scipy(convention):
    from scipy.spatial.transform import Rotation

    angles = (torch.rand(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1) * math.pi
    ours = euler_angles_to_matrix(angles, convention)
    ref = torch.from_numpy(Rotation.from_euler(convention, angles.numpy()).as_matrix())  # upper case: intrinsic
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours @ ours.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(50, 3, 3))
    with pytest.raises(ValueError, match="axis must be X, Y or Z"):
        euler_angles_to_matrix(angles, "XYW")


@pytest.mark.skipif(not HAS_P3D, reason="pytorch3d not installed")
def test_euler_to_matrix_matches_pytorch3d():
    from pytorch3d.transforms import euler_angles_to_matrix as p3d

    from src.geometry.rotation import axis_rotation
    import functools

    angles = torch.rand(20, 3, dtype=torch.float64) * 6 - 3
    ours = functools.reduce(torch.matmul, [axis_rotation(a, t) for a, t in zip("XYZ", angles.unbind(-1))])
    torch.testing.assert_close(ours, p3d(angles, "XYZ"))


# ------------------------------------------------------------------------------------------- chamfer
def test_knn_equals_all_pairs():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 700, 3, generator=g, dtype=torch.float64), torch.rand(2, 300, 3, generator=g, dtype=torch.float64)
    d_knn, i_knn = knn_points(x, y, 3, chunk=128, backend="torch")
    d_all, i_all = knn_points_dense(x, y, 3)
    torch.testing.assert_close(d_knn, d_all)
    assert torch.equal(i_knn, i_all)
    assert d_knn[..., 0].min() >= 0 and (d_knn.diff(dim=-1) >= 0).all()  # ascending
    torch.testing.assert_close(chamfer(x, y), chamfer(x, y, dense=True))
    with pytest.raises(ValueError, match="exceeds"):
        knn_points(x, y[:, :2], 3)


def test_hybrid_chamfer_knn_equals_all_pairs_in_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(2, 4, 30, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 200, 3, generator=g, dtype=torch.float64)
    trans = torch.rand(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fast = hybrid_chamfer(pred, target, trans, k_nearest=3, w_repulse=1.0, margin=0.8)
    slow = hybrid_chamfer(pred, target, trans, k_nearest=3, w_repulse=1.0, margin=0.8, dense=True)
    for key in ("target", "slot", "repulse", "loss"):
        torch.testing.assert_close(fast[key], slow[key])
    assert float(fast["repulse"].detach()) > 0
    for a, b in zip(torch.autograd.grad(fast["loss"], (pred, trans)), torch.autograd.grad(slow["loss"], (pred, trans))):
        torch.testing.assert_close(a, b)


def test_hybrid_chamfer_terms_on_a_hand_made_case():
    """One slot of two points at x=0 and x=1 against targets at x=0 and x=3 (k=1): target term (0 + 4) / 2,
    slot term (0 + 1) / 2."""
    pred = torch.tensor([[[[0.0, 0, 0], [1.0, 0, 0]]]])
    target = torch.tensor([[[0.0, 0, 0], [3.0, 0, 0]]])
    t = hybrid_chamfer(pred, target, torch.zeros(1, 1, 3), k_nearest=1)
    assert float(t["target"]) == pytest.approx(2.0) and float(t["slot"]) == pytest.approx(0.5)
    assert float(t["repulse"]) == 0.0


# ------------------------------------------------------------------------------------------- meshes
def test_ico_sphere_and_prototype_regularisers():
    verts, faces = (torch.from_numpy(a) for a in icosphere(4, prefer_pytorch3d=True))
    assert verts.shape == (2562, 3) and faces.shape == (5120, 3)
    torch.testing.assert_close(verts.norm(dim=-1), torch.ones(2562, dtype=torch.float64))
    protos = Prototypes(3, 2, init_noise=0.0)
    assert protos.edges.shape[0] == 3 * 320 // 2  # closed triangle mesh: E = 3F/2
    smooth = protos.regularisers()
    with torch.no_grad():
        protos.offsets.normal_(0, 0.05)
    rough = protos.regularisers()
    assert rough["normal"] > 3 * smooth["normal"] and rough["laplacian"] > smooth["laplacian"]


def test_sample_points_lie_on_the_mesh_by_area_with_gradients():
    from src.geometry.pu_metrics import point_triangle_distance

    # two triangles of areas 0.5 and 1.5 in the z=0 plane
    verts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [3, 0, 0], [3, 1, 0], [6, 0, 0]], requires_grad=True)
    faces = torch.tensor([[0, 1, 2], [3, 5, 4]])
    pts = sample_points(verts, faces, 20000, torch.Generator().manual_seed(0))
    assert pts.shape == (20000, 3)
    assert float(point_triangle_distance(pts.detach().double(), verts.detach().double(), faces).max()) < 1e-6
    assert float((pts[:, 0] > 2.5).float().mean()) == pytest.approx(0.75, abs=0.02)
    pts.sum().backward()
    assert verts.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- data
def test_back_projection_and_projection_are_inverse():
    depth = torch.full((4, 5), 2.0)
    depth[0, 0] = 0.0
    pts, flat = depth_to_points(depth, fx=10.0, fy=12.0, cx=2.5, cy=2.0)
    assert pts.shape == (19, 3) and int(flat[0]) == 1
    torch.testing.assert_close(pts[0], torch.tensor([(1.5 - 2.5) * 2 / 10, (0.5 - 2.0) * 2 / 12, 2.0]))
    uv, z = project_points(pts, intrinsics_matrix(10.0, 12.0, 2.5, 2.0).float())
    torch.testing.assert_close(uv - 0.5, torch.stack([flat % 5, flat // 5], -1).float())  # at the pixel centres
    torch.testing.assert_close(z, pts[:, 2])


def test_generated_depth_points_lie_on_the_true_primitives(tmp_path):
    """The loader's back-projection (pixel centres, z-depth, OpenCV axes) puts every point on the surface of
    a primitive written in primitives.json (within the millimetre quantisation)."""
    root = write_depth_scenes(tmp_path / "d", n_train=3, n_val=1, n_test=1, image_size=48)
    dm = DepthDataModule(str(root), n_points=4096)
    dm.setup()
    truth = json.loads((root / "primitives.json").read_text())
    for i, path in enumerate(dm.sets["train"].files):
        pts = dm.sets["train"][i]["points"].double()
        residual = []
        for p in truth[f"train/{path.name}"]:
            rot, c, a = (torch.tensor(p[key], dtype=torch.float64) for key in ("rotation", "centre", "half_axes"))
            local = (pts - c) @ rot  # object frame
            if p["kind"] == "ellipsoid":
                residual.append(((local / a).norm(dim=-1) - 1).abs() * a.min())
            else:
                residual.append(((local.abs() - a).max(-1).values).abs())
        assert float(torch.stack(residual).min(0).values.max()) < 5e-3


def test_depth_loader_reads_npy_like_png_and_names_bad_input(tmp_path):
    root = write_depth_scenes(tmp_path / "d", n_train=2, n_val=1, n_test=1, image_size=32)
    png = root / "train" / "0000.png"
    metres = np.asarray(Image.open(png), dtype=np.float32) / 1000.0
    npy_root = tmp_path / "npy"
    npy_root.mkdir()
    for i in range(3):
        np.save(npy_root / f"{i:02d}.npy", metres)
    k = json.loads((root / "intrinsics.json").read_text())
    dm = DepthDataModule(str(npy_root), intrinsics={key: k[key] for key in ("fx", "fy", "cx", "cy")}, holdout=3)
    dm.setup()
    torch.testing.assert_close(dm.sets["test"][0]["depth"][0], torch.from_numpy(metres))
    assert len(dm.sets["train"]) == 2 and len(dm.sets["test"]) == 1
    # an 8-bit PNG is refused by name
    Image.fromarray((metres * 50).astype(np.uint8)).save(root / "train" / "0001.png")
    dm = DepthDataModule(str(root))
    dm.setup()
    with pytest.raises(DataError, match="0001.png.*16-bit"):
        dm.sets["train"][1]
    with pytest.raises(DataError, match=r"data.intrinsics: missing intrinsics key\(s\) \['cy'\]"):
        DepthDataModule(str(root), intrinsics={"fx": 1, "fy": 1, "cx": 1}).setup()
    with pytest.raises(DataError, match="no intrinsics"):
        DepthDataModule(str(npy_root)).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no depth maps"):
        DepthDataModule(str(tmp_path / "empty"), intrinsics={"fx": 1, "fy": 1, "cx": 1, "cy": 1}).setup()


# ----------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_proto_depth_smoke_lowers_the_chamfer(make_cfg, tmp_path):
    """``experiment=proto_depth_smoke`` (600 steps on generated depth maps) writes test/chamfer below 0.7x
    the untrained network's on the same maps (seen: 0.025 vs 0.061), per-slot coverage and overlays."""
    from hydra.utils import instantiate

    from src.pipeline import run

    cfg = make_cfg("experiment=proto_depth_smoke", "callbacks=all", out=tmp_path / "run")
    torch.manual_seed(cfg.seed)
    untrained = instantiate(cfg.model)
    metrics = run(cfg)
    dm = instantiate(cfg.data)
    dm.setup("test")
    before = torch.cat([untrained._score(b)[0]["chamfer"] for b in dm.test_dataloader()]).mean()
    assert metrics["test/chamfer"] < 0.7 * float(before), (metrics["test/chamfer"], float(before))
    assert metrics["test/slots_used"] >= 1
    from tests.conftest import assert_instruments

    assert_instruments(tmp_path / "run", metrics, {
        "train": {"encode", "transform", "sample", "chamfer", "regularisers", "backward", "optimizer"},
        "val": {"encode", "transform", "sample", "chamfer"}})
    coverage = json.loads((tmp_path / "run" / "test_coverage.json").read_text())
    assert len(coverage["per_map"]) == 8 and all(sum(c) == pytest.approx(1.0) for c in coverage["per_map"])
    assert len(list((tmp_path / "run" / "test_images").glob("*_slots.png"))) == 8
    from tests.conftest import assert_same_test_metrics, evaluate_run

    assert_same_test_metrics(metrics, evaluate_run(tmp_path / "run", tmp_path / "eval"))
    assert json.loads((tmp_path / "eval" / "test_coverage.json").read_text()) == coverage
