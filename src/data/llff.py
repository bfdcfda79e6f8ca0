"""LLFF forward-facing scenes (Mildenhall et al., SIGGRAPH 2019), loaded as NeRF does.

``poses_bounds.npy`` holds one row of 17 numbers per image: a 3x5 matrix (camera-to-world 3x4 with
columns [down, right, backwards, translation], then a column [H, W, focal] of the full-size images),
then the near and far depth bounds. Images come from ``images_<factor>`` (``images`` for factor 1); H, W
and the focal are rescaled to the images found. Then, as NeRF's ``load_llff_data``: axes reordered to
[right, up, backwards] (OpenGL), scene scaled so the nearest bound is 1 / ``bd_factor``, poses recentred
on their average pose, every ``llffhold``-th image held out for testing, and a spiral render path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from src import stop
from src.data.blender import Views, read_rgba
from src.data.errors import DataError
from src.render.rays import intrinsics_from_focal

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def viewmatrix(z: np.ndarray, up: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """3x4 camera-to-world with backwards axis ``z``, roughly ``up``, at ``pos``."""
    z = normalize(z)
    x = normalize(np.cross(up, z))
    y = normalize(np.cross(z, x))
    return np.stack([x, y, z, pos], 1)


def poses_avg(poses: np.ndarray) -> np.ndarray:
    """The average pose (3x4) of (N, 3, 4) poses: mean centre, summed backwards and up axes."""
    return viewmatrix(poses[:, :3, 2].sum(0), poses[:, :3, 1].sum(0), poses[:, :3, 3].mean(0))


def recenter_poses(poses: np.ndarray) -> np.ndarray:
    """Express (N, 3, 4) poses in the frame of their average pose (which becomes the identity)."""
    bottom = np.array([[0, 0, 0, 1.0]])
    avg = np.concatenate([poses_avg(poses), bottom], 0)
    full = np.concatenate([poses, np.broadcast_to(bottom, (len(poses), 1, 4))], 1)
    return (np.linalg.inv(avg) @ full)[:, :3, :4]


def spiral_path(poses: np.ndarray, bounds: np.ndarray, n_frames: int = 120, rots: float = 2.0,
                zrate: float = 0.5) -> np.ndarray:
    """NeRF's ``render_path_spiral`` around the (recentred) average pose: (n_frames, 3, 4)."""
    c2w = poses_avg(poses)
    up = normalize(poses[:, :3, 1].sum(0))
    close_depth, inf_depth = bounds.min() * 0.9, bounds.max() * 5.0
    dt = 0.75
    focal = 1.0 / ((1.0 - dt) / close_depth + dt / inf_depth)  # focus depth
    rads = np.append(np.percentile(np.abs(poses[:, :3, 3]), 90, 0), 1.0)
    out = []
    for theta in np.linspace(0.0, 2.0 * np.pi * rots, n_frames + 1)[:-1]:
        c = c2w @ (np.array([np.cos(theta), -np.sin(theta), -np.sin(theta * zrate), 1.0]) * rads)
        z = normalize(c - c2w @ np.array([0, 0, -focal, 1.0]))
        out.append(viewmatrix(z, up, c))
    return np.stack(out)


def load_llff(root: str | Path, factor: int = 8, bd_factor: float = 0.75, recenter: bool = True,
              white_bkgd: bool = False) -> dict:
    """Images (N, H, W, 3), OpenGL c2w (N, 4, 4), K (3, 3), bounds (N, 2), spiral c2w (120, 4, 4)."""
    root = Path(root)
    pb_file = root / "poses_bounds.npy"
    if not pb_file.is_file():
        raise DataError(f"LLFF scene without poses_bounds.npy: {pb_file}")
    try:
        pb = np.load(pb_file)
    except (ValueError, OSError) as e:
        raise DataError(f"unreadable poses_bounds.npy: {pb_file} ({e})") from e
    if pb.ndim != 2 or pb.shape[1] != 17:
        raise DataError(f"{pb_file}: expected an (N, 17) array, got {pb.shape}")
    poses = pb[:, :15].reshape(-1, 3, 5).astype(np.float64)
    bounds = pb[:, 15:17].astype(np.float64)
    img_dir = root / ("images" if factor == 1 else f"images_{factor}")
    if not img_dir.is_dir():
        raise DataError(f"LLFF image folder not found: {img_dir} (data.factor={factor})")
    files = sorted(p for p in img_dir.iterdir() if p.suffix in IMAGE_EXTS)
    if len(files) != len(poses):
        raise DataError(f"{img_dir} has {len(files)} images but {pb_file} has {len(poses)} poses")
    images = []
    for k, f in enumerate(files):
        stop.check(f"loading {img_dir}'s images ({k + 1} of {len(files)})")
        rgba = read_rgba(f)
        rgb, a = rgba[..., :3], rgba[..., 3:]
        images.append(rgb * a + (1.0 - a) * (1.0 if white_bkgd else 0.0))
    if len({im.shape for im in images}) != 1:
        raise DataError(f"{img_dir}: images of different sizes")
    images = np.stack(images).astype(np.float32)
    h, w = images.shape[1:3]
    h_full, w_full, focal_full = poses[0, :, 4]
    focal = focal_full * w / w_full  # the poses' focal is for the full-size images
    # [down, right, backwards] -> [right, up, backwards]
    poses = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:4]], 2)
    scale = 1.0 if bd_factor is None else 1.0 / (bounds.min() * bd_factor)
    poses[:, :, 3] *= scale
    bounds = bounds * scale
    if recenter:
        poses = recenter_poses(poses)
    return {"rgb": torch.from_numpy(images), "c2w": to44(poses), "K": intrinsics_from_focal(w, h, focal),
            "bounds": torch.tensor(bounds, dtype=torch.float32),
            "files": [str(f) for f in files], "hw_full": (int(h_full), int(w_full))}


def to44(poses: np.ndarray) -> torch.Tensor:
    """(N, 3, 4) poses as (N, 4, 4) float32 camera-to-world."""
    out = np.tile(np.eye(4), (len(poses), 1, 1))
    out[:, :3, :4] = poses[:, :3, :4]
    return torch.tensor(out, dtype=torch.float32)


def ndc_rays(h: int, w: int, focal: float, near: float, rays_o: torch.Tensor, rays_d: torch.Tensor):
    """NeRF's normalised device coordinates for forward-facing scenes: rays start on the plane z = -near
    and the space z in (-inf, -near] maps to (-1, 1]; returns (rays_o, rays_d) in NDC."""
    t = -(near + rays_o[..., 2]) / rays_d[..., 2]
    rays_o = rays_o + t[..., None] * rays_d
    ox, oy, oz = rays_o.unbind(-1)
    dx, dy, dz = rays_d.unbind(-1)
    o = torch.stack([-1.0 / (w / (2.0 * focal)) * ox / oz, -1.0 / (h / (2.0 * focal)) * oy / oz, 1.0 + 2.0 * near / oz], -1)
    d = torch.stack([-1.0 / (w / (2.0 * focal)) * (dx / dz - ox / oz), -1.0 / (h / (2.0 * focal)) * (dy / dz - oy / oz),
                     -2.0 * near / oz], -1)
    return o, d


def split_views(scene: dict, llffhold: int) -> dict[str, Views]:
    n = len(scene["rgb"])
    test = list(range(0, n, llffhold)) if llffhold > 0 else []
    train = [i for i in range(n) if i not in test] or list(range(n))
    pick = lambda idx: Views(scene["rgb"][idx], scene["c2w"][idx], scene["K"], [scene["files"][i] for i in idx])  # noqa: E731
    return {"train": pick(train), "val": pick(test or train[:1]), "test": pick(test or train[:1])}
