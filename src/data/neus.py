"""The NeuS / IDR layout of DTU-style scenes, loaded as NeuS does.

``cameras_sphere.npz`` holds per image ``world_mat_i`` (the 4x4 projection ``K [R | t]`` of the calibrated
camera) and ``scale_mat_i`` (normalised -> world: the region of interest is the unit sphere of the normalised
space). NeuS forms ``P = world_mat @ scale_mat`` and splits ``P[:3]`` into intrinsics and a camera-to-world
pose (OpenCV's ``decomposeProjectionMatrix``), so cameras live in the normalised space. Images are
``image/*.png`` (or a capture's ``images/``) and masks ``mask/*.png`` (sorted; same count, optional), both read
as RGB in [0, 1].

Conventions: NeuS casts the ray of pixel (i, j) through the integer coordinates (i, j) (OpenCV: pixel
centres at integers) in OpenCV camera axes (x right, y down, z forward). This project's rays pass through
(i + 0.5, j + 0.5) in OpenGL axes, so the loader returns ``K`` with the principal point shifted by +0.5 and
``c2w`` with its y and z axes negated: the very same rays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from src import stop
from src.data.blender import Views, read_rgba
from src.data.errors import DataError

GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def decompose_projection(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a 3x4 projection ``P ~ K [R | -R C]`` into K (3x3, K[2, 2] = 1, positive focal lengths) and the
    camera-to-world pose (4x4, OpenCV axes: ``[R^T | C]``), as NeuS's ``load_K_Rt_from_P``. RQ decomposition
    of ``P[:, :3]`` by a QR of its row-reversed transpose; ``P`` is only defined up to scale (and sign)."""
    P = np.asarray(P, dtype=np.float64)[:3, :4]
    M = P[:, :3]
    if np.linalg.det(M) < 0:
        P, M = -P, -M
    flip = np.eye(3)[::-1]
    Q, U = np.linalg.qr((flip @ M).T)
    K = flip @ U.T @ flip
    R = flip @ Q.T
    signs = np.diag(np.sign(np.diag(K)))  # positive diagonal of K (K R is unchanged: signs^2 = I)
    K, R = K @ signs, signs @ R
    K = K / K[2, 2]
    C = -np.linalg.solve(M, P[:, 3])  # camera centre: P [C; 1] = 0
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R.T, C
    return K, pose


def _sorted_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise DataError(f"no images in {folder} (expected the NeuS layout: image/*.png, mask/*.png)")
    return files


def load_neus(root: str | Path, downscale: int = 1) -> dict:
    """Every view of a NeuS-layout scene in the normalised space: ``views`` (:class:`Views` with per-view K,
    OpenGL c2w, rgb and masks), ``scale_mat`` (4x4 normalised -> world, of view 0) and the file list."""
    root = Path(root)
    cam_path = root / "cameras_sphere.npz"
    if not cam_path.is_file():
        raise DataError(f"missing {cam_path} (expected the NeuS layout: cameras_sphere.npz, image/, mask/)")
    try:
        cams = dict(np.load(cam_path))
    except Exception as err:  # noqa: BLE001 - any unreadable archive
        raise DataError(f"cannot read {cam_path}: {err}") from err
    # image/ is NeuS's layout; a capture (python -m src.data.capture) keeps its undistorted images in images/
    images = _sorted_images(root / "image" if (root / "image").is_dir() or not (root / "images").is_dir()
                            else root / "images")
    masks = _sorted_images(root / "mask") if (root / "mask").is_dir() else None
    if masks is not None and len(masks) != len(images):
        raise DataError(f"{root}: {len(images)} images but {len(masks)} masks")
    Ks, poses, rgbs, alphas = [], [], [], []
    for i, path in enumerate(images):
        stop.check(f"loading {root}'s images ({i + 1} of {len(images)})")
        for key in (f"world_mat_{i}", f"scale_mat_{i}"):
            if key not in cams:
                raise DataError(f"{cam_path}: missing key '{key}' for image {path.name}")
        K, pose = decompose_projection(cams[f"world_mat_{i}"] @ cams[f"scale_mat_{i}"])
        rgb = read_rgba(path)[..., :3]
        mask = read_rgba(masks[i])[..., :3].mean(-1) if masks is not None else np.ones(rgb.shape[:2], np.float32)
        if mask.shape != rgb.shape[:2]:
            raise DataError(f"{masks[i]}: mask size {mask.shape[::-1]} differs from its image {rgb.shape[1::-1]}")
        if downscale > 1:
            h, w = rgb.shape[:2]
            if h % downscale or w % downscale:
                raise DataError(f"{path}: size {w}x{h} is not divisible by downscale={downscale}")
            rgb = rgb.reshape(h // downscale, downscale, w // downscale, downscale, 3).mean((1, 3))
            mask = mask.reshape(h // downscale, downscale, w // downscale, downscale).mean((1, 3))
            # pixel centres at integers: the new pixel j covers old [f j - 0.5, f j + f - 0.5), centre f j + (f - 1) / 2
            K = np.diag([1.0 / downscale, 1.0 / downscale, 1.0]) @ (K - np.array([[0, 0, (downscale - 1) / 2],
                                                                               [0, 0, (downscale - 1) / 2], [0, 0, 0]]))
        K_gl = K.copy()
        K_gl[:2, 2] += 0.5  # this project's rays go through pixel index + 0.5
        Ks.append(K_gl)
        poses.append(pose @ GL_FROM_CV)
        rgbs.append(rgb)
        alphas.append(mask)
    shapes = {im.shape for im in rgbs}
    if len(shapes) != 1:
        raise DataError(f"{root / 'image'}: images differ in size {sorted(shapes)}")
    views = Views(rgb=torch.from_numpy(np.stack(rgbs)).float(), c2w=torch.from_numpy(np.stack(poses)).float(),
                  K=torch.from_numpy(np.stack(Ks)).float(), files=[str(p) for p in images],
                  mask=torch.from_numpy(np.stack(alphas)).float())
    return {"views": views, "scale_mat": torch.from_numpy(cams["scale_mat_0"].astype(np.float64))}
