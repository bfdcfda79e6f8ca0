"""The methods that render rays (DVGO, NeRF, NeuS): whole images rendered in chunks, scored, saved, and the
camera-path video."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src import stop
from src.data.datamodule import RayScene
from src.loggers import wandb_loggers
from src.metrics import lpips_model, psnr, ssim
from src.models.method import Method, finish_test
from src.phases import phase

log = logging.getLogger(__name__)


def save_png(path: Path, image: torch.Tensor) -> None:
    """Write an (H, W, 3) or (H, W) image in [0, 1] as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image.clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)).save(path)


class RayMethod(Method):
    """A method that renders rays (DVGO, NeRF, NeuS): it provides ``render_rays(rays_o, rays_d) -> {rgb, depth,
    acc}`` and ``hparams.chunk``, and trains on a :class:`~src.data.datamodule.RayScene`. Validation and test
    batches are whole images (``rays_o``, ``rays_d``, ``rgb``: (H, W, 3)), scored by PSNR / SSIM (LPIPS when
    available); after testing, the camera-path video when ``render_path_frames`` > 0."""

    rays_key = "n_rand"
    renders_path = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scene: tuple[float, float, float] | None = None  # near, far, background (set_scene / the datamodule)

    @property
    def scene_data(self) -> RayScene:
        """The datamodule this method trains on (a ray scene)."""
        return self.trainer.datamodule

    @torch.no_grad()
    def render_image(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
                     viewdirs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Render (H, W, 3) rays in chunks of ``hparams.chunk`` rays; outputs keep the image shape. ``viewdirs``
        (unit world directions, for NDC rays of forward-facing scenes) go to models whose ``render_rays``
        takes them."""
        h, w = rays_o.shape[:2]
        c = self.hparams.chunk
        o, d = rays_o.reshape(-1, 3).split(c), rays_d.reshape(-1, 3).split(c)
        v = viewdirs.reshape(-1, 3).split(c) if viewdirs is not None else [None] * len(o)
        chunks = []
        for args in zip(o, d, v):
            stop.check(f"rendering a {h}x{w} image")  # a full-resolution image takes tens of seconds on a CPU
            chunks.append(self.render_rays(*(a for a in args if a is not None)))
        return {k: torch.cat([c[k] for c in chunks]).reshape(h, w, -1).squeeze(-1) for k in chunks[0]}

    def _render_scored(self, batch: dict, split: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tic = time.perf_counter()
        out = self.render_image(batch["rays_o"], batch["rays_d"], batch.get("viewdirs"))
        seconds = time.perf_counter() - tic
        with phase("metrics"):
            scores = {f"{split}/psnr": psnr(out["rgb"], batch["rgb"]), f"{split}/ssim": ssim(out["rgb"], batch["rgb"])}
            model, _ = lpips_model()
            if model is not None and split == "test":
                to_nchw = lambda im: im.permute(2, 0, 1)[None] * 2 - 1  # noqa: E731
                scores["test/lpips"] = model.to(out["rgb"].device)(to_nchw(out["rgb"]), to_nchw(batch["rgb"])).mean()
        scores[f"{split}/render_s_per_img"] = torch.tensor(seconds)
        return out, scores

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out, scores = self._render_scored(batch, "val")
        with phase("log"):
            self.log_eval(scores)
            if batch_idx == 0 and self.trainer.is_global_zero:
                panel = torch.cat([out["rgb"], batch["rgb"], depth_to_gray(out["depth"], out["acc"])], 1)
                save_png(Path(self.trainer.default_root_dir) / "val_images" / f"step{self.global_step:06d}.png", panel)
                for logger in wandb_loggers(self.trainer):
                    logger.log_image(key="val/panel", images=[panel.clamp(0, 1).cpu().numpy()], step=self.global_step,
                                     caption=["prediction | ground truth | depth"])

    def on_test_epoch_start(self) -> None:
        self._test_rows: dict[int, dict] = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        out, scores = self._render_scored(batch, "test")
        folder = Path(self.trainer.default_root_dir) / "test_images"
        index = int(batch["index"])
        files = [f"test_images/{index:03d}_rgb.png", f"test_images/{index:03d}_depth.png"]
        save_png(folder / f"{index:03d}_rgb.png", out["rgb"])
        save_png(folder / f"{index:03d}_depth.png", depth_to_gray(out["depth"], out["acc"])[..., 0])
        self._test_rows[index] = {"view": index, **{k: float(v) for k, v in scores.items()}, "files": files}

    def on_test_epoch_end(self) -> None:
        finish_test(self, self._test_rows)

    def on_test_end(self) -> None:
        """After testing, the camera-path video when ``render_path_frames`` > 0 (rank 0 only)."""
        if self.hparams.get("render_path_frames", 0) and self.trainer.is_global_zero:
            self.render_path_video(self.scene_data, self.hparams.render_path_frames,
                                   Path(self.trainer.default_root_dir), wandb_loggers(self.trainer))

    def set_scene(self, near: float, far: float, background: float) -> None:
        """Ray bounds and background colour, for rendering without a trainer (taken from the datamodule)."""
        self.scene = (float(near), float(far), float(background))

    def _scene(self) -> tuple[float, float, float]:
        if self.scene is None:
            dm = self.scene_data
            self.set_scene(dm.near, dm.far, dm.background)
        return self.scene

    @torch.no_grad()
    def render_path_video(self, dm: RayScene, n_frames: int, out_dir: Path, loggers=(), fps: int = 30) -> Path | None:
        """RGB | depth side by side along the datamodule's camera path (``render_poses(n_frames)``: an orbit for
        Blender, NeuS and generated scenes, NeRF's spiral for LLFF), at the test views' size and intrinsics,
        written to ``<out_dir>/render_path.mp4`` and logged to the W&B ``loggers`` as a video. Returns the file."""
        from src.render import get_rays
        from src.render.video import to_uint8, write_video

        self.set_scene(dm.near, dm.far, dm.background)
        poses = dm.render_poses(n_frames)
        if poses is None or not len(poses):
            log.warning("%s has no camera path: no video", type(dm).__name__)
            return None
        views = dm.splits["test"]
        h, w = views.hw
        was_training = self.training
        self.eval()
        frames = []
        tic = time.perf_counter()
        for c2w in poses:
            rays_o, rays_d = get_rays(h, w, views.intrinsics(0), c2w.to(views.c2w))
            viewdirs = rays_d / rays_d.norm(dim=-1, keepdim=True)  # from the world rays (before any NDC warp)
            rays_o, rays_d = dm.ray_fn(rays_o, rays_d)
            out = self.render_image(rays_o.to(self.device), rays_d.to(self.device), viewdirs.to(self.device))
            frames.append(to_uint8(torch.cat([out["rgb"], depth_to_gray(out["depth"], out["acc"])], 1)))
        self.train(was_training)
        path = write_video(Path(out_dir) / "render_path.mp4", frames, fps)
        log.info("wrote %d frames (rgb | depth) of the camera path to %s in %.1f s", len(frames), path,
                 time.perf_counter() - tic)
        for logger in loggers:
            import wandb

            logger.experiment.log({"test/render_path": wandb.Video(str(path), format=path.suffix[1:])})
        return path


def depth_to_gray(depth: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Depth (H, W) as a grey (H, W, 3) image: near bright, far dark, empty pixels black."""
    valid = acc > 0.5
    if not valid.any():
        return torch.zeros(*depth.shape, 3, device=depth.device)
    d = depth / acc.clamp(min=1e-6)
    lo, hi = d[valid].min(), d[valid].max()
    gray = torch.where(valid, 1 - (d - lo) / (hi - lo + 1e-8) * 0.8, torch.zeros_like(d))
    return gray[..., None].expand(*gray.shape, 3)
