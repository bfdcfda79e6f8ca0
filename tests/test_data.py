"""Loader conventions (generated scenes with exact ground truth, and the real lego when present), bad files."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.blender import DataError, load_split, read_rgba
from src.data.datamodule import BlenderDataModule
from src.data.generate import write_blender
from src.data.scene import default_scene
from src.geometry.camera import project_points
from src.render import get_rays
from tests.conftest import LEGO, needs_lego


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    return write_blender(tmp_path_factory.mktemp("gen") / "scene", image_size=48, n_train=6, n_val=2, n_test=2)


def test_generated_points_land_on_their_pixels_with_their_alpha(scene_root):
    views = load_split(scene_root, "train")
    scene = default_scene()
    h, w = views.hw
    for i in range(len(views)):
        rays_o, rays_d = get_rays(h, w, views.K, views.c2w[i].double())
        hit = scene.intersect(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3))
        found = torch.isfinite(hit["t"])
        assert 0.05 < found.float().mean() < 0.9, "the scene should fill part of the frame"
        uv, depth = project_points(hit["point"][found], views.K.double(), views.c2w[i].double())
        v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        expected = torch.stack([u, v], -1).reshape(-1, 2)[found].double()
        torch.testing.assert_close(uv, expected, atol=1e-4, rtol=0)  # float32 poses in the JSON
        torch.testing.assert_close(depth, hit["t"][found])  # camera-z-normalised rays: t is the depth
        # alpha: 1 where the whole 3x3 neighbourhood is covered, 0 where none of it is
        alpha = read_rgba(scene_root / "train" / f"r_{i}.png")[..., 3]
        cover = found.reshape(h, w).float()[None, None]
        full = torch.nn.functional.max_pool2d(-cover, 3, 1, 1)[0, 0] == -1
        empty = torch.nn.functional.max_pool2d(cover, 3, 1, 1)[0, 0] == 0
        assert (alpha[full.numpy()] == 1).all() and (alpha[empty.numpy()] == 0).all()


def test_generation_is_deterministic_and_cached(scene_root, tmp_path):
    again = write_blender(tmp_path / "again", image_size=48, n_train=6, n_val=2, n_test=2)
    for split in ("train", "test"):
        a, b = load_split(scene_root, split), load_split(again, split)
        assert torch.equal(a.rgb, b.rgb) and torch.equal(a.c2w, b.c2w)
    stamp = (again / "train" / "r_0.png").stat().st_mtime_ns
    write_blender(again, image_size=48, n_train=6, n_val=2, n_test=2)
    assert (again / "train" / "r_0.png").stat().st_mtime_ns == stamp


def test_downscale_is_an_area_average_and_scales_the_focal(scene_root):
    full, half = load_split(scene_root, "val"), load_split(scene_root, "val", downscale=2)
    torch.testing.assert_close(half.rgb, full.rgb.reshape(2, 24, 2, 24, 2, 3).mean((2, 4)))
    torch.testing.assert_close(half.K[:2], full.K[:2] / 2)


def test_white_background_compositing(scene_root):
    views = load_split(scene_root, "val", white_bkgd=True)
    rgba = read_rgba(scene_root / "val" / "r_0.png")
    expected = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    np.testing.assert_allclose(views.rgb[0].numpy(), expected, atol=1e-6)
    assert np.allclose(views.rgb[0].numpy()[rgba[..., 3] == 0], 1.0)


@needs_lego()
@pytest.mark.parametrize("split", ["train", "val"])
def test_lego_cameras_look_at_the_origin(split):
    views = load_split(LEGO, split, downscale=8, stride=1)
    h, w = views.hw
    assert (h, w) == (100, 100)
    for c2w in views.c2w:
        uv, depth = project_points(torch.zeros(1, 3), views.K, c2w)
        assert depth.item() > 2.0
        torch.testing.assert_close(uv[0], torch.tensor([w / 2, h / 2]), atol=0.05 * w, rtol=0)
    # lego's focal: 0.5 * 800 / tan(0.5 * 0.6911) = 1111.1 px at full resolution
    assert abs(float(views.K[0, 0]) * 8 - 1111.11) < 0.1


# ---- bad input: clear errors that name the file ------------------------------------------------
def test_missing_root_names_the_path(tmp_path):
    dm = BlenderDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        dm.prepare_data()


def test_missing_and_unreadable_images_name_the_file(scene_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(scene_root, broken)
    (broken / "val" / "r_1.png").unlink()
    with pytest.raises(DataError, match=r"r_1\.png"):
        load_split(broken, "val")
    (broken / "test" / "r_0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*r_0\.png"):
        load_split(broken, "test")


def test_malformed_transforms_name_the_file(scene_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(scene_root, broken)
    meta = json.loads((broken / "transforms_val.json").read_text())
    del meta["frames"][0]["transform_matrix"]
    (broken / "transforms_val.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"transforms_val\.json.*transform_matrix"):
        load_split(broken, "val")
    (broken / "transforms_test.json").write_text("{")
    with pytest.raises(DataError, match=r"transforms_test\.json: malformed"):
        load_split(broken, "test")


def test_missing_test_split_falls_back_to_val(scene_root, tmp_path):
    no_test = tmp_path / "no_test"
    shutil.copytree(scene_root, no_test)
    (no_test / "transforms_test.json").unlink()
    dm = BlenderDataModule(root=str(no_test), stride={"val": 2})
    dm.setup("test")
    assert dm.test_split_used == "val" and len(dm.splits["test"]) == 2  # every val frame, not the stride


def test_images_of_different_sizes_are_rejected(scene_root, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(scene_root, broken)
    Image.new("RGBA", (10, 10)).save(broken / "val" / "r_1.png")
    with pytest.raises(DataError, match="differ in size"):
        load_split(broken, "val")


def test_missing_dataset_names_it_the_path_and_both_fixes(make_cfg):
    from hydra.utils import instantiate

    from src.data.blender import DataError

    cfg = make_cfg("model=dvgo", "data=lego")  # the test's data dir holds no lego
    with pytest.raises(DataError, match=r"Blender-layout scene .* not found at /\S+/nerf_synthetic/lego: put it there, "
                                        r"or point data\.root=.*NEURAL3D_DATA"):
        instantiate(cfg.data).prepare_data()
    cfg = make_cfg("model=nerf", "data=fern")
    with pytest.raises(DataError, match=r"LLFF scene .* not found at /\S+/nerf_llff_data/fern"):
        instantiate(cfg.data).prepare_data()


def test_datasets_live_under_one_data_dir_in_upstream_layouts(monkeypatch):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    def roots():
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return {d: compose("train", overrides=[f"data={d}"]).data.root for d in ("lego", "fern", "dtu_scan24")}

    repo = Path(CONF_DIR).parent
    assert roots() == {"lego": f"{repo}/data/nerf_synthetic/lego", "fern": f"{repo}/data/nerf_llff_data/fern",
                       "dtu_scan24": f"{repo}/data/dtu_scan24"}
    monkeypatch.setenv("NEURAL3D_DATA", "/datasets")
    assert roots()["lego"] == "/datasets/nerf_synthetic/lego"
    # nothing the product ships points at this project's own machines' folder
    for path in [*Path(CONF_DIR).rglob("*.yaml"), *(repo / "src").rglob("*.py"), repo / "train.py"]:
        assert "../shared" not in path.read_text() and "shared_data" not in path.read_text(), path
