"""Blender / NeRF-synthetic format: ``transforms_{split}.json`` + RGBA PNGs.

Conventions (checked against the real lego in tests): ``transform_matrix`` is camera-to-world with
OpenGL axes; ``focal = 0.5 W / tan(0.5 camera_angle_x)``; RGBA is composited on white (or black);
``downscale`` averages f x f pixel blocks of the composited image (area resize) and scales the focal.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from src import stop
from src.data.errors import DataError
from src.render.rays import intrinsics_from_fov

log = logging.getLogger(__name__)


@dataclass
class Views:
    """Posed images of one split: rgb (N, H, W, 3) float32 in [0, 1], c2w (N, 4, 4), K shared (3, 3) or per
    view (N, 3, 3), and optionally foreground masks (N, H, W) in [0, 1] (NeuS data)."""

    rgb: torch.Tensor
    c2w: torch.Tensor
    K: torch.Tensor
    files: list[str]
    mask: torch.Tensor | None = None

    def intrinsics(self, i: int) -> torch.Tensor:
        """K (3, 3) of view ``i``."""
        return self.K[i] if self.K.dim() == 3 else self.K

    def subset(self, idx) -> "Views":
        """The views ``idx`` (a slice or index list), keeping per-view intrinsics and masks aligned."""
        pick = (lambda t: t[idx]) if isinstance(idx, slice) else (lambda t: t[torch.as_tensor(idx, dtype=torch.long)])
        files = self.files[idx] if isinstance(idx, slice) else [self.files[i] for i in idx]
        return Views(pick(self.rgb), pick(self.c2w), pick(self.K) if self.K.dim() == 3 else self.K, files,
                     None if self.mask is None else pick(self.mask))

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.rgb.shape[1]), int(self.rgb.shape[2])

    def __len__(self) -> int:
        return self.rgb.shape[0]


def read_rgba(path: Path) -> np.ndarray:
    """An image as float32 RGBA (H, W, 4) in [0, 1]; images without alpha get alpha 1."""
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return arr


def composite_and_downscale(rgba: np.ndarray, white_bkgd: bool, factor: int, path: Path) -> np.ndarray:
    """Composite straight-alpha RGBA on the background, then average ``factor`` x ``factor`` blocks."""
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:]) * float(white_bkgd)
    if factor == 1:
        return rgb
    h, w = rgb.shape[:2]
    if h % factor or w % factor:
        raise DataError(f"{path}: size {w}x{h} is not divisible by downscale={factor}")
    return rgb.reshape(h // factor, factor, w // factor, factor, 3).mean((1, 3))


def load_split(root: str | Path, split: str, downscale: int = 1, white_bkgd: bool = True,
               stride: int = 1) -> Views:
    """Load every ``stride``-th frame of ``transforms_{split}.json`` under ``root``."""
    root = Path(root)
    meta_path = root / f"transforms_{split}.json"
    if not meta_path.is_file():
        raise DataError(f"missing {meta_path} (expected the Blender layout: transforms_{{train,val,test}}.json)")
    try:
        meta = json.loads(meta_path.read_text())
        fov = float(meta["camera_angle_x"])
        frames = meta["frames"][::stride]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: malformed ({type(err).__name__}: {err})") from err
    if not frames:
        raise DataError(f"{meta_path}: no frames")
    images, poses, files = [], [], []
    for k, frame in enumerate(frames):
        stop.check(f"loading {meta_path.parent.name}'s images ({k + 1} of {len(frames)})")
        try:
            rel, pose = frame["file_path"], frame["transform_matrix"]
        except KeyError as err:
            raise DataError(f"{meta_path}: frame {k * stride} lacks key {err}") from err
        path = (root / rel).with_suffix(".png") if not rel.endswith(".png") else root / rel
        images.append(composite_and_downscale(read_rgba(path), white_bkgd, downscale, path))
        poses.append(np.asarray(pose, dtype=np.float32))
        files.append(str(path))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"{meta_path}: images differ in size {sorted(shapes)}")
    h, w = images[0].shape[:2]
    return Views(rgb=torch.from_numpy(np.stack(images)), c2w=torch.from_numpy(np.stack(poses)),
                 K=intrinsics_from_fov(w, h, fov), files=files)
