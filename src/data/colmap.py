"""Scenes posed by COLMAP (Schoenberger & Frahm, CVPR 2016): any reconstruction ``ROOT/sparse/0`` (binary or text
model, read by pycolmap) with its images, as ``python -m src.data.capture`` writes one from your photos or video.

Conventions. COLMAP stores world-to-camera poses of OpenCV cameras (x right, y down, z forward) and pixel centres at
index + 0.5, as the suite's rays; a pose becomes the suite's OpenGL camera-to-world (x right, y up, z backwards) as
``inv(w2c) @ diag(1, -1, -1, 1)``. Each image's near / far bounds are the 0.1 and 99.9 percentiles of the depths of
the points it observes (LLFF's ``imgs2poses``). A forward-facing capture (every camera within 60 degrees of the
mean viewing direction) is then treated as NeRF treats LLFF scenes (scaled so the nearest bound is 1 / bd_factor,
recentred on the average pose, NDC rays, the spiral path); a capture around an object ("360") is centred on the
point nearest to every optical axis and scaled so the cameras lie at unit RMS distance from it (the centre and
scale of NeRF's ``spherify``, without its re-orientation), with an orbit path. Distorted camera models are
undistorted by COLMAP first (into ``ROOT/.undistorted``, once).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src import stop
from src.data.blender import composite_and_downscale, read_rgba
from src.data.errors import DataError
from src.data.llff import normalize, recenter_poses, to44

log = logging.getLogger(__name__)
PINHOLE_MODELS = ("SIMPLE_PINHOLE", "PINHOLE")
GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])
FORWARD_FACING_DEG = 60.0


def _pycolmap():
    try:
        import pycolmap
    except ImportError as e:  # a dependency of the project; say how to get it if an environment lacks it
        raise DataError("reading COLMAP reconstructions needs pycolmap: pip install pycolmap") from e
    return pycolmap


def sparse_dir(root: Path) -> Path:
    """The reconstruction under ``root``: ``sparse/0`` (COLMAP's and the capture command's layout), ``sparse``, or
    ``root`` itself when it holds the model files."""
    for d in (root / "sparse" / "0", root / "sparse", root):
        if any((d / f"cameras.{ext}").is_file() for ext in ("bin", "txt")):
            return d
    raise DataError(f"{root}: no COLMAP reconstruction (looked for cameras.bin / cameras.txt in sparse/0, sparse "
                    "and the folder itself); make one from photos or a video with: python -m src.data.capture "
                    f"SOURCE {root}")


def read_colmap(model_dir: Path) -> dict:
    """A COLMAP model as arrays in the suite's conventions, its registered images in name order: ``names``,
    ``K`` (N, 3, 3), ``c2w`` (N, 4, 4) OpenGL camera-to-world, ``bounds`` (N, 2) near / far, ``hw`` (N, 2),
    ``camera_models`` (N names), ``points`` (M, 3)."""
    pycolmap = _pycolmap()
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as e:  # noqa: BLE001 - pycolmap raises its own error types for a bad file
        raise DataError(f"{model_dir}: not a readable COLMAP model ({type(e).__name__}: {e})") from e
    images = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: im.name)
    if not images:
        raise DataError(f"{model_dir}: the reconstruction has no registered image")
    points = {pid: p.xyz for pid, p in rec.points3D.items()}
    names, Ks, c2ws, bounds, hws, models = [], [], [], [], [], []
    for im in images:
        cam = rec.cameras[im.camera_id]
        w2c = np.eye(4)
        w2c[:3, :4] = im.cam_from_world().matrix()
        seen = np.array([points[p.point3D_id] for p in im.points2D if p.has_point3D()]).reshape(-1, 3)
        depth = (seen @ w2c[:3, :3].T + w2c[:3, 3])[:, 2]
        depth = depth[depth > 0]
        if len(depth) < 2:
            raise DataError(f"{model_dir}: image {im.name} observes {len(depth)} reconstructed points; its near / far "
                            "bounds cannot be found (was the model triangulated?)")
        names.append(im.name)
        Ks.append(cam.calibration_matrix())
        c2ws.append(np.linalg.inv(w2c) @ GL_FROM_CV)
        bounds.append([np.percentile(depth, 0.1), np.percentile(depth, 99.9)])
        hws.append([cam.height, cam.width])
        models.append(cam.model_name)
    return {"names": names, "K": np.stack(Ks), "c2w": np.stack(c2ws), "bounds": np.array(bounds),
            "hw": np.array(hws), "camera_models": models,
            "points": np.array(list(points.values())).reshape(-1, 3)}


def undistorted(root: Path, model_dir: Path, image_dir: Path) -> tuple[Path, Path]:
    """A distorted model undistorted by COLMAP into ``root/.undistorted`` (made once, published by rename): its
    model dir and image dir."""
    out = root / ".undistorted"
    if not (out / "sparse").is_dir():
        pycolmap = _pycolmap()
        tmp = root / f".undistorted.tmp{os.getpid()}"
        log.info("undistorting %s's images into %s (COLMAP)", root, out)
        pycolmap.undistort_images(str(tmp), str(model_dir), str(image_dir))
        tmp.rename(out)
    return out / "sparse", out / "images"


def scene_type(c2w: np.ndarray) -> str:
    """``forward-facing`` when every camera looks within :data:`FORWARD_FACING_DEG` of the mean viewing direction,
    else ``360``."""
    forward = -c2w[:, :3, 2]
    mean = normalize(forward.sum(0))
    return "forward-facing" if (forward @ mean).min() > math.cos(math.radians(FORWARD_FACING_DEG)) else "360"


def nearest_point_to_axes(c2w: np.ndarray) -> np.ndarray:
    """The point with the least summed squared distance to every camera's optical axis."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    for pose in c2w:
        d, o = normalize(-pose[:3, 2]), pose[:3, 3]
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ o
    return np.linalg.solve(A, b)


def load_colmap(root: str | Path, factor: int = 1, bd_factor: float | None = 0.75, white_bkgd: bool = False,
                kind: str = "auto") -> dict:
    """The scene at ``root`` (a reconstruction and its images) as the LLFF loader gives one (``rgb``, ``c2w``, ``K``,
    ``bounds``, ``files``, ``hw_full``) plus ``scene_type``. ``factor``: images from
    ``images_<factor>`` when that folder exists, else ``images`` area-downscaled. ``kind``: ``auto``,
    ``forward-facing`` or ``360``."""
    root = Path(root)
    model_dir, image_dir = sparse_dir(root), root / "images"
    model = read_colmap(model_dir)
    if any(m not in PINHOLE_MODELS for m in model["camera_models"]):
        model_dir, image_dir = undistorted(root, model_dir, image_dir)
        model = read_colmap(model_dir)
    K, hw = model["K"], model["hw"]
    if not (np.allclose(K, K[0]) and (hw == hw[0]).all()):
        raise DataError(f"{model_dir}: the images have different intrinsics or sizes; this loader takes one camera "
                        "(capture with one camera, or split the images by camera)")
    h_full, w_full = (int(v) for v in hw[0])
    folder = root / f"images_{factor}" if factor > 1 and (root / f"images_{factor}").is_dir() else image_dir
    images = []
    for k, name in enumerate(model["names"]):
        stop.check(f"loading {root}'s images ({k + 1} of {len(model['names'])})")
        path = folder / name
        rgba = read_rgba(path)
        want = (round(w_full / factor), round(h_full / factor))  # (width, height) at this factor
        if (rgba.shape[1], rgba.shape[0]) != want:  # the full-size image: area-downscale it here
            with Image.open(path) as im:
                rgba = np.asarray(im.convert("RGBA").resize(want, Image.Resampling.BOX), dtype=np.float32) / 255.0
        images.append(composite_and_downscale(rgba, white_bkgd, 1, path))
    if len({im.shape for im in images}) != 1:
        raise DataError(f"{folder}: images of different sizes")
    rgb = np.stack(images).astype(np.float32)
    h, w = rgb.shape[1:3]
    K = K[0].copy()
    K[0] *= w / w_full
    K[1] *= h / h_full
    c2w, bounds = model["c2w"].copy(), model["bounds"].copy()
    kind = scene_type(c2w) if kind == "auto" else kind
    if kind == "forward-facing":
        scale = 1.0 if bd_factor is None else 1.0 / (bounds.min() * bd_factor)
        c2w[:, :3, 3] *= scale
        bounds *= scale
        c2w[:, :3, :4] = recenter_poses(c2w[:, :3, :4])  # its path: NeRF's spiral (LLFFDataModule.render_poses)
    elif kind == "360":  # the orbit of videos: src.render.video.orbit_poses about the centre (the origin now)
        c2w[:, :3, 3] -= nearest_point_to_axes(c2w)
        scale = 1.0 / math.sqrt(float((c2w[:, :3, 3] ** 2).sum(1).mean()))
        c2w[:, :3, 3] *= scale
        bounds *= scale
    else:
        raise DataError(f"data.scene_type={kind!r}: choose auto, forward-facing or 360")
    return {"rgb": torch.from_numpy(rgb), "c2w": to44(c2w), "K": torch.tensor(K, dtype=torch.float32),
            "bounds": torch.tensor(bounds, dtype=torch.float32), "files": [str(folder / n) for n in model["names"]],
            "hw_full": (h_full, w_full), "scene_type": kind}


def compare_poses(c2w: np.ndarray, reference: np.ndarray) -> dict:
    """How far cameras ``c2w`` (N, 4, 4 or 3, 4; OpenGL) are from ``reference`` (same order, any frame and scale)
    after the similarity transform that best maps the centres onto the reference's (COLMAP's ``estimate_sim3d``):
    centre errors as a share of the reference cameras' span (largest distance between two of them), rotation errors
    in degrees; median and max of each."""
    pycolmap = _pycolmap()
    src, dst = c2w[:, :3, 3].astype(np.float64), reference[:, :3, 3].astype(np.float64)
    sim = pycolmap.estimate_sim3d(src, dst)
    if sim is None:
        raise ValueError("no similarity transform maps the camera centres onto the reference's")
    m = sim.matrix()  # 3x4: scale * R | t
    scale = float(np.cbrt(np.linalg.det(m[:, :3])))
    rot = m[:, :3] / scale
    centre_err = np.linalg.norm(src @ m[:, :3].T + m[:, 3] - dst, axis=1)
    span = max(np.linalg.norm(dst[i] - dst[j]) for i in range(len(dst)) for j in range(i + 1, len(dst)))
    rel = np.einsum("nij,nik->njk", rot @ c2w[:, :3, :3], reference[:, :3, :3])  # (R_aligned)^T R_ref
    angle = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)))
    return {"centre_error_median": float(np.median(centre_err) / span), "centre_error_max": float(centre_err.max() / span),
            "rotation_error_median_deg": float(np.median(angle)), "rotation_error_max_deg": float(angle.max()),
            "span": float(span), "scale": scale}


def region_of_interest(points: np.ndarray, margin: float = 1.1, keep: float = 2.0) -> tuple[np.ndarray, float]:
    """The sphere NeuS reconstructs inside, from a reconstruction's sparse points: the centre of the box of the points
    between the ``keep`` and 100 - ``keep`` percentiles of each axis (stray points dropped), and ``margin`` times the
    distance from it to the farthest point kept."""
    lo, hi = np.percentile(points, keep, axis=0), np.percentile(points, 100 - keep, axis=0)
    kept = points[((points >= lo) & (points <= hi)).all(1)]
    centre = (lo + hi) / 2
    return centre, float(margin * np.linalg.norm(kept - centre, axis=1).max())


def write_neus_cameras(root: str | Path) -> Path:
    """NeuS's ``cameras_sphere.npz`` for the (undistorted, pinhole) reconstruction at ``root``, its images in name
    order: ``world_mat_i`` = K [R | t] with NeuS's pixel centres at integers (COLMAP's principal point - 0.5), and
    ``scale_mat_i`` mapping the unit sphere onto :func:`region_of_interest`. ``data=neus data.root=ROOT`` then reads
    the capture (its ``images/``) in NeuS's normalised space."""
    root = Path(root)
    model = read_colmap(sparse_dir(root))
    if any(m not in PINHOLE_MODELS for m in model["camera_models"]):
        raise DataError(f"{root}: the NeuS cameras need an undistorted (pinhole) model; capture with "
                        "python -m src.data.capture, which undistorts")
    centre, radius = region_of_interest(model["points"])
    scale_mat = np.diag([radius, radius, radius, 1.0])
    scale_mat[:3, 3] = centre
    cams = {}
    for i, (K, c2w) in enumerate(zip(model["K"], model["c2w"])):
        K_cv = np.eye(4)
        K_cv[:3, :3] = K
        K_cv[:2, 2] -= 0.5  # NeuS (OpenCV) puts pixel centres at integers
        w2c = np.linalg.inv(c2w @ GL_FROM_CV)  # OpenCV world-to-camera
        cams[f"world_mat_{i}"] = K_cv @ w2c
        cams[f"scale_mat_{i}"] = scale_mat
    path = root / "cameras_sphere.npz"
    np.savez(path, **cams)
    return path
