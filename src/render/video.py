"""Camera paths (an orbit for object scenes; LLFF's spiral lives in :mod:`src.data.llff`) and video files."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def rotation_about(axis: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotation matrix (3, 3) by ``angle`` radians about the unit ``axis`` (Rodrigues)."""
    x, y, z = axis.tolist()
    K = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=axis.dtype)
    return torch.eye(3, dtype=axis.dtype) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def orbit_poses(c2w: torch.Tensor, n_frames: int, centre: torch.Tensor | None = None) -> torch.Tensor:
    """A full turn of the first camera of ``c2w`` (N, 3|4, 4) about the scene's up axis through ``centre``
    (default: the origin, where Blender and NeuS scenes are centred): (n_frames, 4, 4) camera-to-world.

    The up axis is the mean of the cameras' up vectors (OpenGL: camera +y), so the orbit keeps the dataset's
    own up direction, distance and elevation (Blender: about world +z; NeuS / DTU: whatever the capture's was)
    without any convention of its own."""
    c2w = c2w.detach().double().cpu()
    axis = c2w[:, :3, 1].mean(0)
    axis = axis / axis.norm().clamp(min=1e-12)
    centre = torch.zeros(3, dtype=torch.float64) if centre is None else centre.double().cpu()
    first = torch.eye(4, dtype=torch.float64)
    first[:3, :4] = c2w[0, :3, :4]
    out = []
    for k in range(n_frames):
        R = rotation_about(axis, 2 * math.pi * k / n_frames)
        pose = first.clone()
        pose[:3, :3] = R @ first[:3, :3]
        pose[:3, 3] = R @ (first[:3, 3] - centre) + centre
        out.append(pose)
    return torch.stack(out).float()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> uint8 array."""
    return np.round(image.detach().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)


def write_video(path: Path, frames: list[np.ndarray], fps: int = 30) -> Path:
    """Frames (H, W, 3) uint8 -> ``path`` as H.264 mp4 (yuv420p, playable everywhere) through the ffmpeg binary
    that the ``imageio-ffmpeg`` wheel ships; without it, a GIF beside it (``path`` with ``.gif``), said once.
    Odd sizes are padded by one black row / column (H.264 in 4:2:0 needs even sizes). Returns the file written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio_ffmpeg
    except ImportError:
        imageio_ffmpeg = None
    if imageio_ffmpeg is None:
        from PIL import Image

        gif = path.with_suffix(".gif")
        log.warning("imageio-ffmpeg is not installed: writing %s instead of an mp4 (pip install imageio-ffmpeg)", gif)
        images = [Image.fromarray(f) for f in frames]
        images[0].save(gif, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return gif
    h, w = frames[0].shape[:2]
    H, W = h + h % 2, w + w % 2
    writer = imageio_ffmpeg.write_frames(str(path), (W, H), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         quality=8, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)  # start the ffmpeg process
    try:
        for f in frames:
            if (H, W) != (h, w):
                f = np.pad(f, ((0, H - h), (0, W - w), (0, 0)))
            writer.send(np.ascontiguousarray(f))
    finally:
        writer.close()
    return path


def read_video_frames(path: Path) -> tuple[list[np.ndarray], tuple[int, int], float]:
    """Decode ``path`` (for checks): frames (H, W, 3) uint8, (W, H), fps."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    return frames, (w, h), float(meta["fps"])
