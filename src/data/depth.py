"""Depth maps: the loader for depth datasets (16-bit PNG in depth units, or ``.npy`` in metres) with
pinhole intrinsics, back-projection to camera-frame point clouds, and a generator of scenes of primitives
rendered to depth (written as 16-bit PNGs, so the tests run the real loader).

Conventions: OpenCV camera axes (x right, y down, z forward); a pixel holds the z-depth (not the distance
along the ray) of its centre; 0 (or non-finite) marks no measurement. Layout: ``root/{train,val,test}/*.png``
(or ``*.npy``), else every file in ``root`` with every ``holdout``-th held out for val and test;
``root/intrinsics.json`` (``fx, fy, cx, cy``, optional ``depth_scale``) unless the config gives them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from src import stop
from src.data.cache import write_once
from src.data.errors import DataError, missing_root
from src.data.loaders import eval_loader
from src.geometry.rotation import random_rotation

INTRINSIC_KEYS = ("fx", "fy", "cx", "cy")


def depth_to_points(depth: torch.Tensor, fx: float, fy: float, cx: float, cy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth (H, W) -> camera-frame points (n, 3) of the valid pixels and their flat pixel indices:
    ``x = (u + 0.5 - cx) z / fx``, ``y = (v + 0.5 - cy) z / fy`` at pixel centres (u column, v row)."""
    h, w = depth.shape
    v, u = torch.meshgrid(torch.arange(h, dtype=depth.dtype), torch.arange(w, dtype=depth.dtype), indexing="ij")
    valid = (depth > 0) & torch.isfinite(depth)
    z = depth[valid]
    pts = torch.stack([(u[valid] + 0.5 - cx) * z / fx, (v[valid] + 0.5 - cy) * z / fy, z], -1)
    return pts, valid.flatten().nonzero()[:, 0]


def read_depth(path: Path, depth_scale: float) -> torch.Tensor:
    """A depth map in metres (H, W) float32 from a 16-bit PNG (divided by ``depth_scale``) or a ``.npy``."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable .npy depth map ({e})") from e
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"{path}: expected a 2-D numeric depth map, got shape {arr.shape} dtype {arr.dtype}")
        return torch.from_numpy(arr.astype(np.float32))
    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise DataError(f"{path}: expected a 16-bit single-channel depth PNG, got mode {im.mode!r}")
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable depth image ({e})") from e
    return torch.from_numpy(arr / depth_scale)


def load_intrinsics(root: Path, given: dict | None) -> dict:
    """``given`` (the config's ``fx, fy, cx, cy``) or ``root/intrinsics.json``; ``depth_scale`` from the file
    when present."""
    src = root / "intrinsics.json"
    if given is None:
        if not src.is_file():
            raise DataError(f"no intrinsics: set data.intrinsics={{fx,fy,cx,cy}} or write {src}")
        try:
            given = json.loads(src.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{src}: not valid JSON ({e})") from e
    else:
        src = "data.intrinsics"
    missing = [k for k in INTRINSIC_KEYS if k not in given]
    if missing:
        raise DataError(f"{src}: missing intrinsics key(s) {missing} (need {list(INTRINSIC_KEYS)})")
    return {k: float(v) for k, v in given.items()}


def list_split(root: Path, split: str, holdout: int) -> list[Path]:
    def files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix in (".png", ".npy"))

    if (root / "train").is_dir():
        found = files(root / split) if (root / split).is_dir() else []
    else:
        every = files(root)
        found = [p for i, p in enumerate(every) if (i % holdout == 0) == (split != "train")]
    if not found:
        raise DataError(f"no depth maps (.png / .npy) for split {split!r} under {root}")
    return found


class DepthMaps(Dataset):
    """Depth maps of one split: each item is ``depth`` (1, H, W) in metres, ``points`` (n_points, 3) camera
    points of distinct valid pixels (random each time when ``resample``, else fixed), ``centre`` (3,) and ``radius``
    (the valid cloud's centroid and furthest distance: the frame the model works in), ``index``."""

    def __init__(self, files: list[Path], intrinsics: dict, n_points: int, resample: bool, max_depth: float | None,
                 seed: int = 0) -> None:
        self.files, self.k, self.n_points, self.resample = files, intrinsics, n_points, resample
        self.depth_scale = intrinsics.get("depth_scale", 1000.0)
        self.max_depth, self.seed = max_depth, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        depth = read_depth(self.files[i], self.depth_scale)
        if self.max_depth:
            depth = torch.where(depth > self.max_depth, torch.zeros_like(depth), depth)
        pts, _ = depth_to_points(depth, *(self.k[key] for key in INTRINSIC_KEYS))
        if pts.shape[0] < 16:
            raise DataError(f"{self.files[i]}: only {pts.shape[0]} valid depth pixels")
        g = None if self.resample else torch.Generator().manual_seed(self.seed + i)
        if pts.shape[0] >= self.n_points:  # distinct pixels; repeats only when the map has too few
            choice = torch.randperm(pts.shape[0], generator=g)[:self.n_points]
        else:
            choice = torch.randint(pts.shape[0], (self.n_points,), generator=g)
        centre = pts.mean(0)
        return {"depth": depth[None], "points": pts[choice], "centre": centre,
                "radius": (pts - centre).norm(dim=-1).max(), "index": i}


class DepthDataModule(L.LightningDataModule):
    """Depth maps under ``root`` (layout in the module docstring); with ``generate`` set, a generated scene
    set is written there first.

    Args: intrinsics: ``{fx, fy, cx, cy}`` (pixels) or null for ``root/intrinsics.json``. depth_scale: PNG
        units per metre (1000: millimetres) when intrinsics.json does not say. n_points: depth points per map.
        max_depth: metres beyond which pixels are dropped. holdout: every n-th map for val/test when the root
        has no split folders. batch_size, num_workers, seed.
    """

    def __init__(self, root: str, intrinsics: dict | None = None, depth_scale: float = 1000.0, n_points: int = 2048,
                 max_depth: float | None = None, holdout: int = 8, batch_size: int = 8, num_workers: int = 0,
                 generate: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        self.root, self.given_intrinsics, self.depth_scale = Path(root), intrinsics, depth_scale
        self.n_points, self.max_depth, self.holdout = n_points, max_depth, holdout
        self.batch_size, self.num_workers, self.generate, self.seed = batch_size, num_workers, generate, seed
        self.sets: dict[str, DepthMaps] = {}
        self.intrinsics: dict | None = None
        self.test_split_used = "test"

    def prepare_data(self) -> None:
        if self.generate is not None:
            write_depth_scenes(self.root, **self.generate)
        elif not self.root.is_dir():
            raise missing_root(self.root, "depth maps ({train,val,test}/*.png | *.npy)")

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self.intrinsics = {"depth_scale": self.depth_scale, **load_intrinsics(self.root, self.given_intrinsics)}
        for split in ("train", "val", "test"):
            if split not in self.sets:
                self.sets[split] = DepthMaps(list_split(self.root, split, self.holdout), self.intrinsics,
                                             self.n_points, split == "train", self.max_depth, self.seed)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not shuffle:  # evaluation: each map once across DDP ranks
            return eval_loader(self.sets[split], batch_size=self.batch_size, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.sets[split], batch_size=self.batch_size, shuffle=shuffle, generator=g,
                          num_workers=self.num_workers, drop_last=shuffle and len(self.sets[split]) >= self.batch_size,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


# ------------------------------------------------------------------------------------------- generator
def random_primitives(rng: np.random.Generator, max_count: int) -> list[dict]:
    """1..max_count primitives (ellipsoids and boxes) in front of the camera: centre (camera frame, metres),
    half-axes, rotation (object-to-camera)."""
    prims = []
    for _ in range(int(rng.integers(1, max_count + 1))):
        prims.append({"kind": str(rng.choice(["ellipsoid", "box"])),
                      "centre": [float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.6, 0.6)), float(rng.uniform(2.8, 3.8))],
                      "half_axes": rng.uniform(0.15, 0.45, size=3).tolist(), "rotation": random_rotation(rng).tolist()})
    return prims


def ray_cast_depth(prims: list[dict], size: int, fx: float, cx: float) -> np.ndarray:
    """Exact z-depth of the nearest primitive at each pixel centre (0: no hit), (size, size)."""
    v, u = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    dirs = np.stack([(u - cx) / fx, (v - cx) / fx, np.ones_like(u)], -1).reshape(-1, 3)  # z-component 1: t is z
    best = np.full(dirs.shape[0], np.inf)
    for p in prims:
        rot, c, a = np.asarray(p["rotation"]), np.asarray(p["centre"]), np.asarray(p["half_axes"])
        o, d = (-c) @ rot, dirs @ rot  # the ray in the object frame (rot maps object to camera)
        if p["kind"] == "ellipsoid":  # |(o + t d) / a|^2 = 1
            oa, da = o / a, d / a
            qa, qb, qc = (da * da).sum(-1), 2 * (oa * da).sum(-1), (oa * oa).sum() - 1
            disc = qb * qb - 4 * qa * qc
            t = np.where(disc >= 0, (-qb - np.sqrt(np.maximum(disc, 0))) / (2 * qa), np.inf)
        else:  # slabs |o + t d| <= a
            with np.errstate(divide="ignore", invalid="ignore"):
                t1, t2 = (-a - o) / d, (a - o) / d
            t_near = np.nanmax(np.minimum(t1, t2), -1)
            t_far = np.nanmin(np.maximum(t1, t2), -1)
            t = np.where(t_near <= t_far, t_near, np.inf)
        best = np.minimum(best, np.where(t > 0, t, np.inf))
    return np.where(np.isfinite(best), best, 0.0).reshape(size, size)


def write_depth_scenes(root: str | Path, n_train: int = 512, n_val: int = 4, n_test: int = 8, image_size: int = 64,
                       max_primitives: int = 3, seed: int = 0) -> Path:
    """Scenes of 1..max_primitives ellipsoids and boxes rendered to depth: ``{split}/{i:04d}.png`` 16-bit in
    millimetres, ``intrinsics.json`` (a 53-degree field of view), ``primitives.json`` (the true primitives of
    every map); skipped when an identical set is there."""

    params = {"format": "depth", "n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size,
              "max_primitives": max_primitives, "seed": seed, "version": 2}
    f = image_size / (2 * math.tan(math.radians(53.13) / 2))
    intrinsics = {"fx": f, "fy": f, "cx": image_size / 2, "cy": image_size / 2, "depth_scale": 1000.0}

    def fill(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        truth = {}
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            (tmp / split).mkdir(parents=True)
            for i in range(n):
                stop.check(f"generating the depth maps ({split} {i + 1} of {n})")
                prims = random_primitives(rng, max_primitives)
                depth_mm = np.round(ray_cast_depth(prims, image_size, f, image_size / 2) * 1000.0)
                Image.fromarray(depth_mm.astype(np.uint16)).save(tmp / split / f"{i:04d}.png")
                truth[f"{split}/{i:04d}.png"] = prims
        (tmp / "intrinsics.json").write_text(json.dumps(intrinsics, indent=1))
        (tmp / "primitives.json").write_text(json.dumps(truth))

    return write_once(Path(root), params, fill)
