"""Evaluation shared by methods that render rays: full images in chunks, metrics, saved renders."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.loggers import wandb_loggers
from src.metrics import lpips_model, psnr, ssim


def save_png(path: Path, image: torch.Tensor) -> None:
    """Write an (H, W, 3) or (H, W) image in [0, 1] as an 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image.clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)).save(path)


class RenderMixin:
    """For a LightningModule with ``render_rays(rays_o, rays_d) -> {rgb, depth, acc}`` and ``hparams.chunk``.
    Validation and test batches are whole images (``rays_o``, ``rays_d``, ``rgb``: (H, W, 3))."""

    @torch.no_grad()
    def render_image(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> dict[str, torch.Tensor]:
        """Render (H, W, 3) rays in chunks of ``hparams.chunk`` rays; outputs keep the image shape."""
        h, w = rays_o.shape[:2]
        chunks = [self.render_rays(o, d) for o, d in
                  zip(rays_o.reshape(-1, 3).split(self.hparams.chunk), rays_d.reshape(-1, 3).split(self.hparams.chunk))]
        return {k: torch.cat([c[k] for c in chunks]).reshape(h, w, -1).squeeze(-1) for k in chunks[0]}

    def _evaluate(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        tic = time.perf_counter()
        out = self.render_image(batch["rays_o"], batch["rays_d"])
        seconds = time.perf_counter() - tic
        scores = {f"{split}/psnr": psnr(out["rgb"], batch["rgb"]), f"{split}/ssim": ssim(out["rgb"], batch["rgb"])}
        model, _ = lpips_model()
        if model is not None and split == "test":
            to_nchw = lambda im: im.permute(2, 0, 1)[None] * 2 - 1  # noqa: E731
            scores["test/lpips"] = model.to(out["rgb"].device)(to_nchw(out["rgb"]), to_nchw(batch["rgb"])).mean()
        scores[f"{split}/render_s_per_img"] = torch.tensor(seconds)
        self.log_dict(scores, on_epoch=True, batch_size=1, sync_dist=True)
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._evaluate(batch, "val")
        if batch_idx == 0 and self.trainer.is_global_zero:
            panel = torch.cat([out["rgb"], batch["rgb"], depth_to_gray(out["depth"], out["acc"])], 1)
            save_png(Path(self.trainer.default_root_dir) / "val_images" / f"step{self.global_step:06d}.png", panel)
            for logger in wandb_loggers(self.trainer):
                logger.log_image(key="val/panel", images=[panel.clamp(0, 1).cpu().numpy()], step=self.global_step,
                                 caption=["prediction | ground truth | depth"])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        out = self._evaluate(batch, "test")
        folder = Path(self.trainer.default_root_dir) / "test_images"
        index = int(batch["index"])
        save_png(folder / f"{index:03d}_rgb.png", out["rgb"])
        save_png(folder / f"{index:03d}_depth.png", depth_to_gray(out["depth"], out["acc"])[..., 0])


def depth_to_gray(depth: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Depth (H, W) as a grey (H, W, 3) image: near bright, far dark, empty pixels black."""
    valid = acc > 0.5
    if not valid.any():
        return torch.zeros(*depth.shape, 3, device=depth.device)
    d = depth / acc.clamp(min=1e-6)
    lo, hi = d[valid].min(), d[valid].max()
    gray = torch.where(valid, 1 - (d - lo) / (hi - lo + 1e-8) * 0.8, torch.zeros_like(d))
    return gray[..., None].expand(*gray.shape, 3)
