"""NeRF: hierarchical sampling follows the coarse weights' CDF, chunked rendering equals one pass, a short
run on the generated scene learns."""
from __future__ import annotations

import json

import pytest
import torch

from src.models.nerf import NeRFModule
from src.models.nerf.network import NeRFMLP
from src.render.encoding import positional_encoding
from src.pipeline import run
from src.render.sampling import sample_pdf, stratified_depths
from tests.conftest import assert_instruments


def test_nerf_sample_pdf_follows_the_cdf():
    bins = torch.linspace(0, 10, 11).expand(4, 11).contiguous()
    one_hot = torch.zeros(4, 10)
    one_hot[:, 3] = 1.0
    s = sample_pdf(bins, one_hot, 64, det=False, generator=torch.Generator().manual_seed(0))
    inside = ((s >= 3) & (s <= 4)).float().mean()
    assert inside > 0.99  # (the 1e-5 floor on empty bins leaves a tiny mass elsewhere)
    # deterministic levels on uniform weights: the inverse CDF is the identity map onto [0, 10]
    det = sample_pdf(bins, torch.ones(4, 10), 11, det=True)
    torch.testing.assert_close(det, torch.linspace(0, 10, 11).expand(4, 11), atol=1e-4, rtol=0)
    # random levels: the fraction of samples per bin matches the weights
    w = torch.tensor([[1.0, 3.0, 0.0, 6.0]])
    edges = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    s = sample_pdf(edges, w, 20000, det=False, generator=torch.Generator().manual_seed(1))
    hist = torch.histc(s, bins=4, min=0, max=4) / s.numel()
    torch.testing.assert_close(hist, torch.tensor([0.1, 0.3, 0.0, 0.6]), atol=0.015, rtol=0)


def test_nerf_stratified_depths_stay_in_their_intervals():
    near, far = torch.full((5,), 2.0), torch.full((5,), 6.0)
    z = stratified_depths(near, far, 8, perturb=True, generator=torch.Generator().manual_seed(0))
    assert (z >= 2).all() and (z <= 6).all() and (z[:, 1:] >= z[:, :-1]).all()
    torch.testing.assert_close(stratified_depths(near, far, 5, perturb=False)[0], torch.tensor([2.0, 3, 4, 5, 6]))


def test_nerf_mlp_shapes_and_skip():
    assert positional_encoding(torch.zeros(2, 3), 10).shape == (2, 63)
    net = NeRFMLP()
    assert net.trunk[5].in_features == 256 + 63  # the encoded input re-enters after layer 4 (0-based)
    rgb, sigma = net(torch.randn(7, 3), torch.nn.functional.normalize(torch.randn(7, 3), dim=-1))
    assert rgb.shape == (7, 3) and sigma.shape == (7,)


def test_nerf_full_image_render_equals_its_chunks():
    torch.manual_seed(0)
    model = NeRFModule(n_samples=16, n_importance=16, netdepth=2, netwidth=32, netdepth_fine=2, netwidth_fine=32,
                       chunk=10_000).eval()
    model.set_scene(2.0, 6.0, 1.0)
    rays_o = torch.tensor([0.0, 0.0, 4.0]).expand(12, 9, 3).contiguous()
    rays_d = torch.nn.functional.normalize(torch.randn(12, 9, 3), dim=-1) - torch.tensor([0.0, 0.0, 1.0])
    whole = model.render_image(rays_o, rays_d)
    model.hparams.chunk = 7  # 108 rays in 16 chunks, the last one partial
    chunked = model.render_image(rays_o, rays_d)
    for k in ("rgb", "depth", "acc"):
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-5, atol=1e-6)
    assert whole["rgb"].shape == (12, 9, 3)


@pytest.mark.slow
def test_nerf_smoke_learns(make_cfg, tmp_path):
    out = tmp_path / "run"
    metrics = run(make_cfg("experiment=nerf_smoke", "callbacks=all", out=out))
    assert_instruments(out, metrics, {"train": {"sample", "mlp.coarse", "composite", "mlp.fine", "loss", "backward",
                                                "optimizer"}, "val": {"mlp.coarse", "composite", "metrics"}})
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/psnr"] == pytest.approx(metrics["test/psnr"])
    assert saved["test/psnr"] > 18.0, saved  # white-only prediction scores ~11 dB on this scene
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    psnr = [float(r.split(",")[header.index("train/psnr")]) for r in rows[1:] if r.split(",")[header.index("train/psnr")]]
    assert psnr[-1] > psnr[0] + 5
    # its density, meshed from the checkpoint, lies near the exact surface
    from src.export_mesh import main

    mesh = main([str(out), "--resolution", "48", "--n-points", "10000"])
    assert mesh["faces"] > 500 and mesh["chamfer"] < 0.06, mesh
    # eval.py on its checkpoint reproduces the test scores
    from tests.conftest import assert_same_test_metrics, evaluate_run

    assert_same_test_metrics(metrics, evaluate_run(out, tmp_path / "eval"))


# ------------------------------------------------------------------------------------------- LLFF
def test_llff_generated_scene_conventions(tmp_path):
    """Recentred poses (average pose = identity), the bd_factor rescale, focal from the poses, held-out views,
    and NDC: the ray through the image centre of a camera at the origin starts at (0, 0, -1), direction (0, 0, 2)."""
    from src.data.datamodule import LLFFDataModule
    from src.data.llff import ndc_rays, poses_avg

    dm = LLFFDataModule(str(tmp_path / "llff"), factor=1, llffhold=8,
                        generate={"image_size": 24, "n_views": 16, "supersample": 1})
    dm.setup("fit")
    dm.setup("test")
    c2w = dm.scene["c2w"]
    torch.testing.assert_close(torch.tensor(poses_avg(c2w[:, :3, :4].double().numpy())),
                               torch.eye(4, dtype=torch.float64)[:3], atol=1e-5, rtol=0)
    assert float(dm.scene["bounds"].min()) == pytest.approx(1 / 0.75)
    assert len(dm.splits["test"]) == 2 and len(dm.splits["train"]) == 14  # views 0 and 8 held out
    focal = 0.5 * 24 / torch.tan(torch.tensor(0.6911112070083618 / 2))
    assert float(dm.scene["K"][0, 0]) == pytest.approx(float(focal), rel=1e-5)
    # every camera looks roughly along the average viewing direction (-z after recentring)
    assert (c2w[:, 2, 2] > 0.95).all()
    o, d = ndc_rays(24, 24, float(focal), 1.0, torch.zeros(1, 3), torch.tensor([[0.0, 0.0, -1.0]]))
    torch.testing.assert_close(o, torch.tensor([[0.0, 0.0, -1.0]]))
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, 2.0]]))
    # every NDC training ray starts on the near plane z = -1 and heads into the unit cube (+z)
    assert torch.allclose(dm.train_rays.rays_o[:, 2], torch.tensor(-1.0), atol=1e-5)
    assert (dm.train_rays.rays_d[:, 2] > 0).all()


def test_llff_view_directions_are_the_world_rays_directions(tmp_path):
    """nerf-pytorch feeds the colour head the unit *world* ray directions taken before the NDC warp (NDC
    directions barely vary within an image); training rays, test items and what the MLP receives all carry them."""
    import torch.nn.functional as F

    from src.data.datamodule import LLFFDataModule
    from src.models.nerf import NeRFModule
    from src.render import get_rays

    dm = LLFFDataModule(str(tmp_path / "llff"), factor=1, llffhold=8,
                        generate={"image_size": 24, "n_views": 16, "supersample": 1})
    dm.setup("fit")
    dm.setup("test")
    train = dm.splits["train"]
    world_d = torch.stack([get_rays(24, 24, train.K, c)[1] for c in train.c2w]).reshape(-1, 3)
    torch.testing.assert_close(dm.train_rays.viewdirs, F.normalize(world_d, dim=-1))
    assert not torch.allclose(F.normalize(dm.train_rays.rays_d, dim=-1), dm.train_rays.viewdirs, atol=1e-2)
    item = dm.test_dataloader().dataset[0]
    test_d = get_rays(24, 24, dm.splits["test"].K, dm.splits["test"].c2w[0])[1]
    torch.testing.assert_close(item["viewdirs"], F.normalize(test_d, dim=-1))

    model = NeRFModule(n_rand=8, n_samples=4, n_importance=0, netdepth=2, netwidth=16, chunk=256, iters=1).eval()
    model.set_scene(0.0, 1.0, 0.0)
    seen = []
    query = model._query
    model._query = lambda net, pts, dirs: (seen.append(dirs), query(net, pts, dirs))[1]
    model.render_image(item["rays_o"], item["rays_d"], item["viewdirs"])
    torch.testing.assert_close(torch.cat(seen), item["viewdirs"].reshape(-1, 3))


def test_llff_real_fern_matches_nerf_conventions():
    """On the real fern (when ../shared/data has it): NeRF's focal at factor 8 (3260.5 / 8 px), the
    504x378 images, 20 views with 3 held out, recentred average pose."""
    from tests.conftest import SHARED_DATA

    root = SHARED_DATA / "nerf_llff_data" / "fern"
    if not (root / "poses_bounds.npy").is_file():
        pytest.skip(f"real fern not found at {root}")
    from src.data.llff import load_llff, poses_avg, split_views

    scene = load_llff(root, factor=8)
    assert tuple(scene["rgb"].shape) == (20, 378, 504, 3)
    assert float(scene["K"][0, 0]) == pytest.approx(407.56, abs=0.05)
    assert [len(v) for v in split_views(scene, 8).values()] == [17, 3, 3]
    torch.testing.assert_close(torch.tensor(poses_avg(scene["c2w"][:, :3, :4].double().numpy())),
                               torch.eye(4, dtype=torch.float64)[:3], atol=1e-5, rtol=0)


def test_llff_bad_input_names_the_file(tmp_path):
    from src.data.blender import DataError
    from src.data.llff import load_llff

    with pytest.raises(DataError, match="poses_bounds.npy"):
        load_llff(tmp_path)
    import numpy as np

    np.save(tmp_path / "poses_bounds.npy", np.zeros((3, 17)))
    (tmp_path / "images_8").mkdir()
    with pytest.raises(DataError, match="0 images but .* has 3 poses"):
        load_llff(tmp_path, factor=8)


@pytest.mark.slow
def test_nerf_on_generated_llff_runs_and_writes_the_spiral_video(make_cfg, tmp_path):
    from src.render.video import read_video_frames

    out = tmp_path / "llff"
    metrics = run(make_cfg("experiment=nerf_smoke", "data=synthetic_llff", "data.generate.image_size=24",
                           "data.generate.n_views=12", "model.iters=60", "model.render_path_frames=3",
                           "model.raw_noise_std=1.0", out=out))
    assert metrics["data/test_split"] == "test" and metrics["test/psnr"] > 8
    frames, size, fps = read_video_frames(out / "render_path.mp4")  # H.264: rgb | depth, 24 x 24 each
    assert len(frames) == 3 and size == (48, 24) and fps == 30
    assert len({f.tobytes() for f in frames}) == 3  # the camera moves along the spiral
