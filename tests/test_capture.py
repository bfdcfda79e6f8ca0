"""Your own capture: COLMAP reconstructions read in the suite's conventions (on a model this test writes from known
cameras and points), the capture command on the real fern photos (every image registered, the published poses
recovered), its errors, and - slow - a video of the fern photos through the same command, and NeRF's smoke preset on
the captured fern against the same preset on the published fern."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.errors import DataError
from tests.conftest import SHARED_DATA

pycolmap = pytest.importorskip("pycolmap")

FERN = SHARED_DATA / "nerf_llff_data" / "fern"
needs_fern = pytest.mark.skipif(not (FERN / "images_8").is_dir(), reason=f"real fern not found at {FERN}")
W, H, F = 64, 48, 60.0


def _quat_wxyz(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(R).as_quat()
    return np.array([w, x, y, z])


def write_text_model(folder: Path, c2w_gl: list[torch.Tensor], points: np.ndarray, W: int = W, H: int = H,
                     F: float = F) -> dict:
    """A COLMAP text model (cameras.txt, images.txt, points3D.txt, as COLMAP documents them) of one W x H PINHOLE
    camera of focal F at the OpenGL camera-to-world poses ``c2w_gl`` observing ``points``; each observation is the
    pixel the suite's own projection gives. Returns what was written, for comparison."""
    from src.geometry.camera import project_points

    K = torch.tensor([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]], dtype=torch.float64)
    folder.mkdir(parents=True)
    (folder / "cameras.txt").write_text(f"1 PINHOLE {W} {H} {F} {F} {W / 2} {H / 2}\n")
    tracks: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(points))}
    lines, depths = [], []
    for k, c2w in enumerate(c2w_gl):
        uv, depth = project_points(torch.from_numpy(points), K, c2w.double())
        seen = ((depth > 0) & (uv[:, 0] > 0) & (uv[:, 0] < W) & (uv[:, 1] > 0) & (uv[:, 1] < H)).nonzero()[:, 0]
        w2c = np.linalg.inv(c2w.double().numpy() @ np.diag([1.0, -1.0, -1.0, 1.0]))  # OpenCV world-to-camera
        q, t = _quat_wxyz(w2c[:3, :3]), w2c[:3, 3]
        lines.append(f"{k + 1} {' '.join(map(str, q))} {' '.join(map(str, t))} 1 view_{k:03d}.png")
        obs = []
        for j, pid in enumerate(seen.tolist()):
            obs.append(f"{uv[pid, 0]:.6f} {uv[pid, 1]:.6f} {pid + 1}")
            tracks[pid].append((k + 1, j))
        lines.append(" ".join(obs))
        depths.append(depth[seen].numpy())
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    (folder / "points3D.txt").write_text("".join(
        f"{i + 1} {x} {y} {z} 128 128 128 0.5 {' '.join(f'{a} {b}' for a, b in tracks[i])}\n"
        for i, (x, y, z) in enumerate(points) if tracks[i]))
    return {"K": K.numpy(), "depths": depths}


def _hemisphere(n: int = 12) -> list[torch.Tensor]:
    from src.data.generate import hemisphere_cameras

    return hemisphere_cameras(n, 0.0)


def _forward(n: int = 12) -> list[torch.Tensor]:
    from src.data.generate import forward_facing_cameras

    return forward_facing_cameras(n)


def test_a_colmap_model_reads_in_the_suites_conventions(tmp_path):
    """Text and binary models of known cameras: the OpenGL camera-to-world poses and K come back exactly, near / far
    are the 0.1 / 99.9 percentiles of each image's point depths, and COLMAP's own projection of every point lands on
    the pixel the suite's projection gave (the pose and pixel-centre conventions agree)."""
    from src.data.colmap import read_colmap

    rng = np.random.default_rng(0)
    points = rng.uniform(-0.8, 0.8, (400, 3))
    cams = _hemisphere()
    written = write_text_model(tmp_path / "text", cams, points)
    binary = tmp_path / "bin"
    binary.mkdir()
    rec = pycolmap.Reconstruction(str(tmp_path / "text"))
    rec.write(str(binary))
    assert (binary / "images.bin").is_file()
    for folder in (tmp_path / "text", binary):
        model = read_colmap(folder)
        assert model["names"] == [f"view_{k:03d}.png" for k in range(len(cams))]
        np.testing.assert_allclose(model["c2w"], torch.stack(cams).double().numpy(), atol=1e-9)
        np.testing.assert_allclose(model["K"][0], written["K"], atol=1e-12)
        for k, d in enumerate(written["depths"]):
            np.testing.assert_allclose(model["bounds"][k], [np.percentile(d, 0.1), np.percentile(d, 99.9)], rtol=1e-9)
    for im in rec.images.values():
        for p in im.points2D:
            projected = im.project_point(rec.points3D[p.point3D_id].xyz)
            np.testing.assert_allclose(projected, p.xy, atol=1e-5)


def _write_images(folder: Path, names: list[str], size=(W, H)) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / n)


@pytest.mark.parametrize("kind", ["forward-facing", "360"])
def test_a_colmap_scene_is_normalised_as_its_kind_is(tmp_path, kind):
    """Forward-facing cameras are scaled and recentred as NeRF's LLFF loader does (NDC rays, spiral path); cameras
    around an object are centred on the point nearest every optical axis and put at unit RMS distance (orbit path,
    world-space rays). Images at another factor come back area-downscaled with K scaled alike."""
    from src.data.colmap import load_colmap, nearest_point_to_axes
    from src.data.datamodule import ColmapDataModule
    from src.data.llff import poses_avg

    cams = _forward() if kind == "forward-facing" else _hemisphere()
    model = tmp_path / "scene" / "sparse" / "0"
    write_text_model(model, cams, np.random.default_rng(0).uniform(-0.8, 0.8, (400, 3)))
    _write_images(tmp_path / "scene" / "images", [f"view_{k:03d}.png" for k in range(len(cams))])
    scene = load_colmap(tmp_path / "scene", factor=2)
    assert scene["scene_type"] == kind and scene["rgb"].shape == (len(cams), H // 2, W // 2, 3)
    np.testing.assert_allclose(scene["K"].numpy(), [[F / 2, 0, W / 4], [0, F / 2, H / 4], [0, 0, 1]], atol=1e-5)
    c2w = scene["c2w"].double().numpy()
    if kind == "forward-facing":
        np.testing.assert_allclose(poses_avg(c2w[:, :3, :4]), np.eye(4)[:3], atol=1e-5)  # recentred
        assert scene["bounds"].min() == pytest.approx(1 / 0.75, rel=1e-5)
    else:
        assert np.sqrt((c2w[:, :3, 3] ** 2).sum(1).mean()) == pytest.approx(1.0, rel=1e-5)
        np.testing.assert_allclose(nearest_point_to_axes(c2w), 0.0, atol=1e-5)
    dm = ColmapDataModule(str(tmp_path / "scene"), factor=2, llffhold=4)
    dm.setup("fit")
    assert dm.ndc == (kind == "forward-facing") and len(dm.splits["test"]) == 3 and len(dm.splits["train"]) == 9
    assert dm.render_poses(8).shape == (8, 4, 4)


def test_the_neus_form_of_a_colmap_scene_sees_every_point_at_the_same_pixel(tmp_path):
    """``cameras_sphere.npz`` written from a reconstruction (as the capture writes it): NeuS's loader puts the
    cameras in the normalised space of the sparse points' sphere, and each point, normalised alike, projects to the
    pixel it has in the original cameras (intrinsics, pixel-centre shift and pose conventions agree); every point
    lies inside the unit sphere."""
    from src.data.colmap import write_neus_cameras
    from src.data.neus import load_neus
    from src.geometry.camera import project_points

    cams = _hemisphere()
    points = np.random.default_rng(0).uniform(-0.8, 0.8, (400, 3))
    write_text_model(tmp_path / "scene" / "sparse" / "0", cams, points)
    _write_images(tmp_path / "scene" / "images", [f"view_{k:03d}.png" for k in range(len(cams))])
    write_neus_cameras(tmp_path / "scene")
    scene = load_neus(tmp_path / "scene")
    views, S = scene["views"], scene["scale_mat"].numpy()
    normalised = (points - S[:3, 3]) / S[0, 0]
    assert np.linalg.norm(normalised, axis=1).max() < 1.0 and len(views) == len(cams)
    K = torch.tensor([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]], dtype=torch.float64)
    for k, c2w in enumerate(cams):
        uv, depth = project_points(torch.from_numpy(points), K, c2w.double())
        uv_neus, depth_neus = project_points(torch.from_numpy(normalised), views.K[k].double(), views.c2w[k].double())
        torch.testing.assert_close(uv_neus, uv, atol=2e-3, rtol=0)
        torch.testing.assert_close(depth_neus * S[0, 0], depth, atol=1e-4, rtol=1e-4)


def test_downscaled_copies_keep_the_models_image_names(tmp_path):
    """Phone photos are JPEGs: ``images_<f>/`` holds them under the same names the model (and data=colmap) uses."""
    from src.data.capture import downscale_images

    src = tmp_path / "images"
    src.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(src / "IMG_0001.JPG")
    Image.new("RGB", (64, 48), (10, 200, 10)).save(src / "b.png")
    downscale_images(src, tmp_path / "images_2", 2)
    assert sorted(p.name for p in (tmp_path / "images_2").iterdir()) == ["IMG_0001.JPG", "b.png"]
    with Image.open(tmp_path / "images_2" / "IMG_0001.JPG") as im:
        assert im.format == "JPEG" and im.size == (32, 24)


def test_a_folder_without_a_reconstruction_says_how_to_make_one(tmp_path):
    from src.data.colmap import load_colmap

    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"no COLMAP reconstruction .* python -m src.data.capture SOURCE"):
        load_colmap(tmp_path)


@needs_fern
def test_capture_of_the_fern_photos_registers_all_and_recovers_the_published_poses(tmp_path):
    """The 20 fern photos (images_8): every one registered, sub-pixel reprojection error, the camera centres within
    1% of the cameras' span of the published poses after a similarity alignment and the rotations within 1 degree;
    OUT in the documented layout with nothing left beside it."""
    from src.data.capture import capture
    from src.data.colmap import compare_poses, read_colmap

    out = tmp_path / "fern"
    report = capture(FERN / "images_8", out)
    assert report["registered"] == report["images"] == 20 and report["not_registered"] == []
    assert report["mean_reprojection_error_px"] < 1.0 and report["points"] > 1000
    assert report["scene_type"] == "forward-facing"
    assert json.loads((out / "capture.json").read_text()) == report
    for sub in ("images", "images_2", "images_4", "images_8", "sparse/0", "colmap"):
        assert (out / sub).is_dir(), sub
    assert (out / "cameras_sphere.npz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fern"]  # no temporary left
    published = np.load(FERN / "poses_bounds.npy")[:, :15].reshape(-1, 3, 5)
    reference = np.concatenate([published[:, :, 1:2], -published[:, :, 0:1], published[:, :, 2:4]], 2)
    err = compare_poses(read_colmap(out / "sparse" / "0")["c2w"], reference)
    print("fern capture vs published poses:", err)
    assert err["centre_error_max"] < 0.01 and err["rotation_error_max_deg"] < 1.0, err

    # the distorted model (SIMPLE_RADIAL) as a user's own COLMAP run leaves it: data=colmap undistorts it first
    from src.data.colmap import load_colmap

    raw = tmp_path / "raw"
    shutil.copytree(out / "colmap" / "sparse" / "0", raw / "sparse" / "0")
    shutil.copytree(out / "colmap" / "images", raw / "images")
    assert set(read_colmap(raw / "sparse" / "0")["camera_models"]) == {"SIMPLE_RADIAL"}
    scene, undistorted = load_colmap(raw, factor=2), load_colmap(out, factor=2)
    assert (raw / ".undistorted" / "sparse").is_dir() and scene["rgb"].shape == undistorted["rgb"].shape
    torch.testing.assert_close(scene["c2w"], undistorted["c2w"], atol=1e-5, rtol=0)


def _expect_capture_error(source: Path, out: Path, match: str, **kwargs) -> None:
    from src.data.capture import capture

    with pytest.raises(DataError, match=match):
        capture(source, out, **kwargs)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp*"))  # nothing half-written


def test_capture_errors_name_the_file_and_leave_nothing(tmp_path):
    photos = tmp_path / "photos"
    _write_images(photos, ["a.png", "b.png", "c.png"])
    Image.new("RGB", (80, 60)).save(photos / "d.png")
    _expect_capture_error(photos, tmp_path / "out", r"photos: images of different sizes \(64x48: 3 .*80x60: 1 \(d.png\)")
    (photos / "d.png").write_bytes(b"not an image")
    _expect_capture_error(photos, tmp_path / "out", r"d.png: not a readable image")
    (photos / "d.png").unlink()
    _expect_capture_error(photos, tmp_path / "out", r"COLMAP found no reconstruction in 3 images .* more overlap")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_capture_error(empty, tmp_path / "out", r"empty: no images")
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 1000)
    _expect_capture_error(video, tmp_path / "out", r"clip.mp4: not a readable video|clip.mp4: the video has no frames")
    (tmp_path / "taken").mkdir()
    from src.data.capture import capture

    with pytest.raises(DataError, match=r"taken exists: the capture writes a new folder"):
        capture(photos, tmp_path / "taken")


@needs_fern
def test_too_few_registered_images_are_named(tmp_path):
    """Fern's 20 photos and 5 photos of noise at the same size: 20 of 25 register; asking for 90% names the 5."""
    photos = tmp_path / "photos"
    shutil.copytree(FERN / "images_8", photos)
    with Image.open(next(photos.iterdir())) as im:
        size = im.size
    _write_images(tmp_path / "noise", [f"zz_noise_{k}.png" for k in range(5)], size)
    for f in (tmp_path / "noise").iterdir():
        shutil.move(str(f), photos / f.name)
    _expect_capture_error(photos, tmp_path / "out", r"registered 20 of 25 images \(fewer than 90%\); not registered: "
                                                    r"zz_noise_0.png, .*zz_noise_4.png\. What usually helps",
                          min_registered=0.9)


def _nerf_smoke(make_cfg, out: Path, *data: str) -> dict:
    from src.pipeline import run

    return run(make_cfg("experiment=nerf_smoke", *data, out=out))


@pytest.mark.slow
@needs_fern
def test_nerf_smoke_on_the_captured_fern_scores_as_on_the_published_fern(make_cfg, tmp_path):
    """NeRF's smoke preset on ``data=colmap`` of the captured fern reaches the test PSNR of the same preset on
    ``data=fern`` (the published poses) within 1 dB."""
    from src.data.capture import capture

    capture(FERN / "images_8", tmp_path / "fern")
    captured = _nerf_smoke(make_cfg, tmp_path / "run_colmap", "data=colmap", f"data.root={tmp_path / 'fern'}")
    published = _nerf_smoke(make_cfg, tmp_path / "run_fern", "data=fern", f"data.root={FERN}")
    print(f"NeRF smoke test PSNR: captured fern {captured['test/psnr']:.2f}, published fern {published['test/psnr']:.2f}")
    assert abs(captured["test/psnr"] - published["test/psnr"]) < 1.0, (captured["test/psnr"], published["test/psnr"])


@pytest.mark.slow
@needs_fern
def test_a_video_of_the_fern_photos_goes_to_a_trained_nerf(make_cfg, tmp_path):
    """A video of the fern photos (each held for three frames, the first and last of them blurred) through the
    capture command: the sharp frame of each photo is kept, all register (sequential matching), and NeRF's smoke
    preset trains on the result."""
    import imageio_ffmpeg
    from PIL import ImageFilter

    from src.data.capture import capture

    photos = sorted((FERN / "images_8").iterdir())
    with Image.open(photos[0]) as im:
        w, h = im.size
    video = tmp_path / "fern.mp4"
    writer = imageio_ffmpeg.write_frames(str(video), (w, h), fps=6, quality=9, macro_block_size=2)
    writer.send(None)
    for p in photos:
        with Image.open(p) as im:
            sharp = im.convert("RGB")
            blurred = sharp.filter(ImageFilter.GaussianBlur(3))
            for frame in (blurred, sharp, blurred):
                writer.send(np.ascontiguousarray(np.asarray(frame)))
    writer.close()
    report = capture(video, tmp_path / "scene", frames=len(photos))
    assert report["images"] == report["registered"] == len(photos) and report["matching"] == "sequential", report
    metrics = _nerf_smoke(make_cfg, tmp_path / "run", "data=colmap", f"data.root={tmp_path / 'scene'}")
    print(f"NeRF smoke on the fern video: test PSNR {metrics['test/psnr']:.2f}")
    assert metrics["test/psnr"] > 15.0


def _generated_scene_as_colmap(make_cfg, folder: Path) -> Path:
    """The generated scene of DVGO's smoke preset (29 cameras around an object) written as a COLMAP reconstruction:
    a text model of its cameras observing points on its surface, its images beside it, and NeuS's
    ``cameras_sphere.npz`` of the same cameras (as the capture command writes one)."""
    from hydra.utils import instantiate

    from src.data.colmap import write_neus_cameras

    dm = instantiate(make_cfg("experiment=dvgo_smoke").data)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    views = [(i, dm.splits[split]) for split in ("train", "val", "test") for i in range(len(dm.splits[split]))]
    h, w = views[0][1].hw
    write_text_model(folder / "sparse" / "0", [v.c2w[i] for i, v in views], dm.gt_surface(seed=0, n=2000).double().numpy(),
                     w, h, float(views[0][1].intrinsics(0)[0, 0]))
    (folder / "images").mkdir()
    for k, (i, v) in enumerate(views):
        shutil.copy(v.files[i], folder / "images" / f"view_{k:03d}.png")
    write_neus_cameras(folder)
    return folder


@pytest.mark.slow
def test_dvgo_trains_on_a_360_colmap_scene(smoke_run, make_cfg, data_dir, tmp_path):
    """The generated scene (DVGO's smoke data) written as a COLMAP model of its 29 cameras and points on its surface:
    ``data=colmap`` takes it as a 360 capture (normalised to the cameras' unit sphere, world-space rays) and DVGO's
    smoke preset learns it (white-only prediction scores about 11 dB; the smoke run's figure is the same preset on
    the Blender layout, with its own test views)."""
    from src.pipeline import run

    scene = _generated_scene_as_colmap(make_cfg, tmp_path / "scene")
    # a 300-step coarse stage: at the preset's 150 the coarse grid is still empty on this model and DVGO stops
    # before its fine stage (on the Blender layout 150 coarse steps barely suffice: the coarse grid alone scores 10.8 dB)
    metrics = run(make_cfg("experiment=dvgo_smoke", "data=colmap", f"data.root={scene}", "data.white_bkgd=true",
                           "model.coarse.iters=300", out=tmp_path / "run"))
    print(f"DVGO smoke on the generated scene as a COLMAP model: test PSNR {metrics['test/psnr']:.2f} "
          f"(Blender layout: {smoke_run[1]['test/psnr']:.2f})")
    assert metrics["test/psnr"] > 18.0 and metrics["data/test_split"] == "test"


@pytest.mark.slow
def test_neus_trains_on_the_neus_form_of_a_colmap_scene(make_cfg, tmp_path):
    """The same scene through ``cameras_sphere.npz`` (``data=neus data.root=...``, every 8th view held out): NeuS's
    smoke preset beats predicting the training images' mean colour on the held-out views by 3 dB and meshes the
    object."""
    from src.data.neus import load_neus
    from src.metrics import psnr
    from src.pipeline import run

    scene = _generated_scene_as_colmap(make_cfg, tmp_path / "scene")
    views = load_neus(scene)["views"]
    held = list(range(0, len(views), 8))
    mean = views.rgb[[i for i in range(len(views)) if i not in held]].mean((0, 1, 2))
    baseline = float(torch.stack([psnr(mean.expand_as(views.rgb[i]), views.rgb[i]) for i in held]).mean())
    metrics = run(make_cfg("experiment=neus_smoke", "data=neus", f"data.root={scene}", "data.holdout=8",
                           out=tmp_path / "run"))
    print(f"NeuS smoke on the NeuS form of a COLMAP scene: test PSNR {metrics['test/psnr']:.2f} "
          f"(mean colour {baseline:.2f}), mesh {metrics['mesh/vertices']} vertices")
    assert metrics["test/psnr"] > baseline + 3.0 and metrics["mesh/vertices"] > 1000
