"""LightningDataModules for posed-image scenes on disk (Blender, LLFF and NeuS layouts, and the generated scenes in
each), and :class:`RayScene`, what the ray methods use of them."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from src.data.blender import Views, load_split
from src.data.errors import missing_root
from src.data.loaders import eval_loader
from src.data.rays import RayBank
from src.render.rays import get_rays

log = logging.getLogger(__name__)


class RayScene(Protocol):
    """What a ray method (:class:`src.models.rendering.RayMethod`) and the mesh export use of their data: posed
    views per split, the ray bank to draw training rays from, ray bounds and background, the rays' warp (NDC for
    forward-facing scenes), the video's camera path, and the world frame and exact surface for meshes."""

    near: float
    far: float
    splits: dict[str, Views]
    train_rays: RayBank | None

    @property
    def background(self) -> float: ...

    def ray_fn(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def render_poses(self, n_frames: int) -> torch.Tensor | None: ...

    def to_world(self, points: torch.Tensor) -> torch.Tensor: ...

    def gt_surface(self, seed: int = 1) -> torch.Tensor | None: ...


class StepTicker(IterableDataset):
    """Endless training 'batches' that carry nothing: ray-bank methods sample their rays themselves
    (their pool depends on the model, e.g. DVGO's in-mask-cache rays), keyed on the global step."""

    def __iter__(self) -> Iterator[int]:
        tick = 0
        while True:
            yield tick
            tick += 1


class ImageViews(Dataset):
    """One full image a batch: rays (H, W, 3) and target rgb (H, W, 3), for rendering in chunks.
    ``ray_fn`` maps camera rays to the rays the model uses (e.g. NDC for forward-facing scenes)."""

    def __init__(self, views: Views, ray_fn=None) -> None:
        self.views, self.ray_fn = views, ray_fn

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        h, w = self.views.hw
        rays_o, rays_d = get_rays(h, w, self.views.intrinsics(i), self.views.c2w[i])
        item = {}
        if self.ray_fn is not None:  # view directions from the world rays, before the warp (nerf-pytorch)
            item["viewdirs"] = rays_d / rays_d.norm(dim=-1, keepdim=True)
            rays_o, rays_d = self.ray_fn(rays_o, rays_d)
        item.update({"rays_o": rays_o, "rays_d": rays_d, "rgb": self.views.rgb[i], "index": i})
        if self.views.mask is not None:
            item["mask"] = self.views.mask[i]
        return item


class BlenderDataModule(L.LightningDataModule):
    """Blender-layout scene at ``root``; with ``generate`` set, the procedural scene is written there first.

    Args:
        root: folder holding ``transforms_{train,val,test}.json``.
        downscale: integer area-resize factor (the focal is scaled with it).
        white_bkgd: composite alpha on white (Blender scenes) instead of black.
        near, far: ray bounds in units of the camera-z-normalised ray direction.
        stride: keep every k-th frame of each split, e.g. ``{val: 8}`` for a quick validation subset.
        test_split: the split rendered by ``trainer.test``; if its JSON is absent, ``val`` is used.
        test_stride: every k-th frame of whichever split is tested (default: ``stride.test`` for the test
            split, every frame of ``val`` when it stands in).
        generate: parameters of :func:`src.data.generate.write_blender`, or None for real data.
    """

    def __init__(self, root: str, downscale: int = 1, white_bkgd: bool = True, near: float = 2.0,
                 far: float = 6.0, stride: dict[str, int] | None = None, test_split: str = "test",
                 generate: dict[str, int] | None = None, test_stride: int | None = None) -> None:
        super().__init__()
        if int(downscale) != downscale or downscale < 1:
            raise ValueError(f"data.downscale must be a positive integer, got {downscale}")
        self.root, self.downscale, self.white_bkgd = Path(root), int(downscale), white_bkgd
        self.near, self.far = float(near), float(far)
        self.stride = {"train": 1, "val": 1, "test": 1, **(stride or {})}
        self.test_split, self.generate, self.test_stride = test_split, generate, test_stride
        self.splits: dict[str, Views] = {}
        self.test_split_used: str | None = None  # set by setup("test"): test_split, or "val" if it is absent
        self.train_rays: RayBank | None = None

    @property
    def background(self) -> float:
        return 1.0 if self.white_bkgd else 0.0

    layout = "blender"  # the on-disk layout: names the writer of the generated scene
    what = "Blender-layout scene (transforms_{train,val,test}.json + images)"  # for the missing-data error

    def prepare_data(self) -> None:
        if self.generate is not None:
            from src.data import generate

            getattr(generate, f"write_{self.layout}")(self.root, **self.generate)
        elif not self.root.is_dir():
            raise missing_root(self.root, self.what)

    def _load(self, split: str) -> Views:
        if split not in self.splits:
            self.splits[split] = load_split(self.root, split, self.downscale, self.white_bkgd, self.stride[split])
        return self.splits[split]

    def resolved_test_split(self) -> str:
        if (self.root / f"transforms_{self.test_split}.json").is_file():
            return self.test_split
        log.warning("%s has no transforms_%s.json: testing on 'val' (every frame)", self.root, self.test_split)
        return "val"

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent: also covers direct use without a Trainer
        if stage in (None, "fit") and self.train_rays is None:
            train = self._load("train")
            self.train_rays = RayBank.from_views(train.rgb, train.c2w, train.K)
            self._load("val")
        if stage in (None, "validate"):
            self._load("val")
        if stage in (None, "test"):
            if "test" not in self.splits:  # every frame of the test split (of val when test is absent)
                split = self.test_split_used = self.resolved_test_split()
                stride = self.test_stride or (self.stride[split] if split == "test" else 1)
                self.splits["test"] = load_split(self.root, split, self.downscale, self.white_bkgd, stride)

    def ray_fn(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rays the model sees (identity; NDC for forward-facing scenes)."""
        return rays_o, rays_d

    def to_world(self, points: torch.Tensor) -> torch.Tensor:
        """The model's coordinates to the data's world coordinates (identity; NeuS scenes scale back)."""
        return points

    def render_poses(self, n_frames: int) -> torch.Tensor:
        """The camera path for videos: a full orbit of the first test camera about the scene's up axis through
        the origin (the centre of Blender and generated scenes), ``n_frames`` c2w (4, 4)."""
        from src.render.video import orbit_poses

        return orbit_poses(self.splits["test"].c2w, n_frames)

    def gt_surface(self, seed: int = 1, n: int = 30000) -> torch.Tensor | None:
        """Points on the exact surface of the generated scene (world coordinates), for the mesh metrics;
        None for real data."""
        if self.generate is None:
            return None
        from src.data.scene import default_scene

        return default_scene().sample_surface(n, seed=seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepTicker(), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return eval_loader(ImageViews(self.splits["val"]), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(ImageViews(self.splits["test"]), batch_size=None)


class LLFFDataModule(BlenderDataModule):
    """LLFF forward-facing scene at ``root`` (``poses_bounds.npy`` + ``images_<factor>``), loaded as NeRF does
    (:mod:`src.data.llff`); with ``generate`` set, the procedural scene is written there in that layout.

    Args: factor: image folder ``images_<factor>``. llffhold: every k-th image is held out (val and test).
        bd_factor: scene scale so the nearest bound is 1 / bd_factor. ndc: rays in normalised device
        coordinates (near 0, far 1), for forward-facing training; otherwise near/far from the bounds.
        white_bkgd: composite transparent pixels on white. stride: every k-th frame per split.
    """

    def __init__(self, root: str, factor: int = 8, llffhold: int = 8, bd_factor: float = 0.75, ndc: bool = True,
                 white_bkgd: bool = False, stride: dict[str, int] | None = None,
                 generate: dict[str, int] | None = None) -> None:
        super().__init__(root, 1, white_bkgd, 0.0, 1.0, stride, "test", generate)
        self.factor, self.llffhold, self.bd_factor, self.ndc = int(factor), int(llffhold), bd_factor, ndc
        self.scene: dict | None = None

    layout = "llff"
    what = "LLFF scene (poses_bounds.npy + images_<factor>/)"

    def ray_fn(self, rays_o: torch.Tensor, rays_d: torch.Tensor):
        if not self.ndc:
            return rays_o, rays_d
        from src.data.llff import ndc_rays

        h, w = self.scene["rgb"].shape[1:3]
        return ndc_rays(h, w, float(self.scene["K"][0, 0]), 1.0, rays_o, rays_d)

    def _load(self, split: str) -> Views:
        if self.scene is None:
            from src.data.llff import load_llff, split_views

            self.scene = load_llff(self.root, self.factor, self.bd_factor, white_bkgd=self.white_bkgd)
            bounds = self.scene["bounds"]
            if not self.ndc:
                self.near, self.far = float(bounds.min()) * 0.9, float(bounds.max())
            for name, views in split_views(self.scene, self.llffhold).items():
                k = self.stride[name]
                self.splits[name] = views.subset(slice(None, None, k))
        return self.splits[split]

    def resolved_test_split(self) -> str:
        return "test"

    def gt_surface(self, seed: int = 1, n: int = 30000) -> None:
        return None  # the loader rescales and recentres the scene: no ground truth in its frame

    def render_poses(self, n_frames: int) -> torch.Tensor:
        """NeRF's spiral path around the average pose (``render_path_spiral``: 2 turns) in ``n_frames`` c2w."""
        from src.data.llff import spiral_path

        self._load("test")
        spiral = spiral_path(self.scene["c2w"][:, :3, :4].double().numpy(), self.scene["bounds"].double().numpy(), n_frames)
        out = torch.eye(4).repeat(n_frames, 1, 1)
        out[:, :3, :4] = torch.as_tensor(spiral, dtype=torch.float32)
        return out

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if stage in (None, "fit") and self.train_rays is None:
            train = self._load("train")
            bank = RayBank.from_views(train.rgb, train.c2w, train.K)
            o, d = self.ray_fn(bank.rays_o, bank.rays_d)
            viewdirs = bank.rays_d / bank.rays_d.norm(dim=-1, keepdim=True) if self.ndc else None
            self.train_rays = RayBank(o, d, bank.rgb, viewdirs)
        self._load("val")
        if stage in (None, "test"):
            self.test_split_used = "test"

    def val_dataloader(self) -> DataLoader:
        return eval_loader(ImageViews(self.splits["val"], self.ray_fn if self.ndc else None), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return eval_loader(ImageViews(self.splits["test"], self.ray_fn if self.ndc else None), batch_size=None)


class ColmapDataModule(LLFFDataModule):
    """A scene posed by COLMAP at ``root`` (``sparse/0`` + ``images/``, as ``python -m src.data.capture`` writes one;
    :mod:`src.data.colmap`): forward-facing captures as LLFF scenes (NDC, spiral path), captures around an object
    normalised to the unit sphere of the cameras (no NDC, orbit path).

    Args: factor: images from ``images_<factor>`` (or ``images`` downscaled). llffhold: every k-th image is held out
        (val and test). bd_factor: forward-facing scale (the nearest bound is 1 / bd_factor). ndc: ``auto`` (NDC for
        forward-facing scenes), true or false. scene_type: ``auto`` (from the cameras), ``forward-facing`` or ``360``.
    """

    def __init__(self, root: str, factor: int = 1, llffhold: int = 8, bd_factor: float = 0.75, ndc: str | bool = "auto",
                 scene_type: str = "auto", white_bkgd: bool = False, stride: dict[str, int] | None = None) -> None:
        super().__init__(root, factor, llffhold, bd_factor, True, white_bkgd, stride, None)
        self.ndc_setting, self.scene_type = ndc, scene_type

    layout = "colmap"
    what = "COLMAP reconstruction (sparse/0 + images/; python -m src.data.capture makes one)"

    def _load(self, split: str) -> Views:
        if self.scene is None:
            from src.data.colmap import load_colmap
            from src.data.llff import split_views

            self.scene = load_colmap(self.root, self.factor, self.bd_factor, self.white_bkgd, self.scene_type)
            self.ndc = self.scene["scene_type"] == "forward-facing" if self.ndc_setting == "auto" else bool(self.ndc_setting)
            log.info("COLMAP scene %s: %s, %d images, %s", self.root, self.scene["scene_type"], len(self.scene["rgb"]),
                     "NDC rays" if self.ndc else "world-space rays")
            if not self.ndc:
                bounds = self.scene["bounds"]
                self.near, self.far = float(bounds.min()) * 0.9, float(bounds.max())
            for name, views in split_views(self.scene, self.llffhold).items():
                self.splits[name] = views.subset(slice(None, None, self.stride[name]))
        return self.splits[split]

    def render_poses(self, n_frames: int) -> torch.Tensor:
        """NeRF's spiral for a forward-facing capture; for a 360 one the Blender scenes' orbit of the first test
        camera about the up axis through the (normalised) centre."""
        self._load("test")
        if self.scene["scene_type"] == "forward-facing":
            return super().render_poses(n_frames)
        return BlenderDataModule.render_poses(self, n_frames)


class NeuSDataModule(BlenderDataModule):
    """A scene in the NeuS / IDR layout of DTU (``cameras_sphere.npz``, ``image/``, ``mask/``; :mod:`src.data.neus`),
    in the normalised space where the region of interest is the unit sphere; with ``generate`` set, the
    procedural scene is written there in that layout first (and its exact surface is the ground truth).

    Args: downscale: integer area-resize factor. holdout: every k-th view is held out for val/test (0: NeuS's
        protocol, train on every view; val/test then render training views, every ``stride.test``-th).
        stride: every k-th frame per split. gt_points: number of points sampled on the ground-truth surface
        (generated scenes) for the mesh metrics.
    """

    def __init__(self, root: str, downscale: int = 1, holdout: int = 0, stride: dict[str, int] | None = None,
                 generate: dict[str, int] | None = None, gt_points: int = 30000) -> None:
        super().__init__(root, downscale, False, 0.0, 2.0, stride, "test", generate)
        self.holdout, self.gt_points = int(holdout), int(gt_points)
        self.scale_mat: torch.Tensor | None = None

    layout = "neus"
    what = "NeuS-layout scene (cameras_sphere.npz, image/, mask/)"

    def _load(self, split: str) -> Views:
        if not self.splits:
            from src.data.neus import load_neus

            scene = load_neus(self.root, self.downscale)
            views, self.scale_mat = scene["views"], scene["scale_mat"]
            n = len(views)
            held = list(range(0, n, self.holdout)) if self.holdout > 0 else list(range(n))
            train = [i for i in range(n) if i not in held] if self.holdout > 0 else list(range(n))
            self.splits["train"] = views.subset(train)
            for name in ("val", "test"):
                self.splits[name] = views.subset(held[:: self.stride[name]])
        return self.splits[split]

    def resolved_test_split(self) -> str:
        return "test"

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self._load("train")
        if stage in (None, "test"):
            self.test_split_used = "test (held-out views)" if self.holdout > 0 else "test (training views: NeuS protocol)"

    def to_world(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised-space points (N, 3) to the data's world coordinates (``scale_mat``)."""
        S = self.scale_mat.to(points)
        return points @ S[:3, :3].T + S[:3, 3]

    def gt_surface(self, seed: int = 1) -> torch.Tensor | None:
        """About ``gt_points`` points on the exact ground-truth surface in world coordinates (generated scenes),
        else None."""
        if self.generate is None:
            return None
        from src.data.scene import default_scene

        return default_scene().sample_surface(self.gt_points, seed=seed)
