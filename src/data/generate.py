"""Write the procedural scene to disk in real dataset formats, so the real loaders are what tests run.

Blender format (as NeRF's ``nerf_synthetic``): ``{split}/r_{i}.png`` RGBA (straight alpha, background
transparent) and ``transforms_{split}.json`` with ``camera_angle_x`` and camera-to-world
``transform_matrix`` per frame (OpenGL axes). Cameras sit on the upper hemisphere looking at the origin.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src import stop
from src.data.cache import write_once
from src.data.scene import Scene, default_scene
from src.render.rays import get_rays, intrinsics_from_fov

log = logging.getLogger(__name__)

CAMERA_ANGLE_X = 0.6911112070083618  # lego's field of view
CAMERA_RADIUS = 4.0


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world (4, 4), OpenGL axes: the camera's -z points from ``eye`` to ``target``; world up is +z."""
    target = torch.zeros(3, dtype=torch.float64) if target is None else target
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) if up is None else up
    z = eye - target
    z = z / z.norm()
    x = torch.linalg.cross(up, z)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w


def hemisphere_cameras(n: int, offset: float, radius: float = CAMERA_RADIUS, z_range=(0.1, 0.95)) -> list[torch.Tensor]:
    """``n`` look-at cameras spread over the upper hemisphere by a Fibonacci spiral (``offset`` in [0, 1)
    shifts the spiral so splits do not share views); ``z_range``: the range of the elevation's sine
    (``(-0.9, 0.95)`` surrounds the object, for surface reconstruction)."""
    golden = math.pi * (3 - math.sqrt(5))
    poses = []
    for i in range(n):
        z = z_range[0] + (z_range[1] - z_range[0]) * ((i + offset) / n)
        phi = golden * i + 2 * math.pi * offset
        rho = math.sqrt(1 - z * z)
        eye = radius * torch.tensor([rho * math.cos(phi), rho * math.sin(phi), z], dtype=torch.float64)
        poses.append(look_at(eye))
    return poses


def render_view(scene: Scene, c2w: torch.Tensor, size: int, supersample: int) -> np.ndarray:
    """RGBA (size, size, 4) float in [0, 1], straight alpha, anti-aliased by ``supersample``^2 rays a pixel."""
    hi = size * supersample
    K = intrinsics_from_fov(hi, hi, CAMERA_ANGLE_X).double()
    rays_o, rays_d = get_rays(hi, hi, K, c2w)
    hit = scene.intersect(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3))
    rgb = scene.shade(hit).reshape(hi, hi, 3)
    alpha = torch.isfinite(hit["t"]).double().reshape(hi, hi, 1)
    blocks = torch.cat([rgb * alpha, alpha], -1).reshape(size, supersample, size, supersample, 4).mean((1, 3))
    a = blocks[..., 3:]
    straight = torch.where(a > 0, blocks[..., :3] / a.clamp(min=1e-12), torch.zeros_like(blocks[..., :3]))
    return torch.cat([straight, a], -1).numpy()


def write_blender(root: str | Path, image_size: int, n_train: int, n_val: int, n_test: int,
                  supersample: int = 2, scene: Scene | None = None) -> Path:
    """Render the scene into ``root`` in the Blender layout, skipping the work if an identical copy is there."""
    params = {"format": "blender", "image_size": image_size, "n_train": n_train, "n_val": n_val,
              "n_test": n_test, "supersample": supersample, "version": 1}

    def fill(tmp: Path) -> None:
        sc = scene or default_scene()
        for split, n, offset in (("train", n_train, 0.0), ("val", n_val, 0.37), ("test", n_test, 0.71)):
            (tmp / split).mkdir(parents=True)
            frames = []
            for i, c2w in enumerate(hemisphere_cameras(n, offset)):
                stop.check(f"generating the scene's {split} views ({i + 1} of {n})")
                rgba = render_view(sc, c2w, image_size, supersample)
                Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA").save(tmp / split / f"r_{i}.png")
                frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
            (tmp / f"transforms_{split}.json").write_text(
                json.dumps({"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}, indent=1))

    return write_once(Path(root), params, fill)


def forward_facing_cameras(n: int, distance: float = CAMERA_RADIUS, spread: float = 0.6) -> list[torch.Tensor]:
    """``n`` roughly parallel cameras on a small patch of the plane ``y = -distance`` (a hand-held capture
    of the scene from the front), all looking along +y, slightly down, as LLFF scenes are shot."""
    poses = []
    for i in range(n):
        a = 2 * math.pi * i / max(n, 1) * 1.618
        r = spread * math.sqrt((i + 0.5) / n)
        eye = torch.tensor([r * math.cos(a), -distance, 0.6 + 0.6 * r * math.sin(a)], dtype=torch.float64)
        poses.append(look_at(eye, eye + torch.tensor([0.0, distance, -0.6], dtype=torch.float64)))
    return poses


def write_llff(root: str | Path, image_size: int, n_views: int, supersample: int = 2, factor: int = 1,
               scene: Scene | None = None) -> Path:
    """The scene in the LLFF layout: ``poses_bounds.npy`` (rows of a 3x5 [down, right, backwards, centre,
    (H, W, focal)] matrix and near/far bounds) and ``images`` (or ``images_<factor>``) composited on white.
    Bounds come from the scene's bounding sphere. Skipped when an identical copy is there."""
    params = {"format": "llff", "image_size": image_size, "n_views": n_views, "supersample": supersample,
              "factor": factor, "version": 1}
    focal = float(intrinsics_from_fov(image_size, image_size, CAMERA_ANGLE_X)[0, 0])

    def fill(tmp: Path) -> None:
        sc = scene or default_scene()
        folder = tmp / ("images" if factor == 1 else f"images_{factor}")
        folder.mkdir(parents=True)
        rows = []
        for i, c2w in enumerate(forward_facing_cameras(n_views)):
            stop.check(f"generating the scene's views ({i + 1} of {n_views})")
            rgba = render_view(sc, c2w, image_size, supersample)
            rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
            Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB").save(folder / f"{i:03d}.png")
            R, t = c2w[:3, :3].numpy(), c2w[:3, 3].numpy()
            llff = np.stack([-R[:, 1], R[:, 0], R[:, 2], t], 1)  # [right, up, back] -> [down, right, back]
            hwf = np.array([image_size * factor, image_size * factor, focal * factor])  # full-size images
            depth = float(np.dot(-R[:, 2], -t))  # distance of the origin along the view axis
            rows.append(np.concatenate([np.concatenate([llff, hwf[:, None]], 1).ravel(),
                                        [max(depth - 1.6, 0.1), depth + 1.6]]))
        np.save(tmp / "poses_bounds.npy", np.stack(rows))

    return write_once(Path(root), params, fill)


NEUS_SCALE = 1.2  # radius of the sphere (world units) that the NeuS layout's scale_mat maps to the unit sphere


def write_neus(root: str | Path, image_size: int, n_views: int, supersample: int = 2, scene: Scene | None = None) -> Path:
    """The scene in the NeuS / IDR layout of DTU: ``cameras_sphere.npz`` (``world_mat_i`` = K [R | t] of an
    OpenCV camera with pixel centres at integers, ``scale_mat_i`` mapping the unit sphere to a sphere of
    radius ``NEUS_SCALE`` around the origin, which holds the whole scene), ``image/NNN.png`` on black and
    binary ``mask/NNN.png``. Cameras surround the object. Skipped when an identical copy is there."""
    params = {"format": "neus", "image_size": image_size, "n_views": n_views, "supersample": supersample,
              "version": 1}
    K_gl = intrinsics_from_fov(image_size, image_size, CAMERA_ANGLE_X).double()
    K_cv = torch.eye(4, dtype=torch.float64)
    K_cv[:3, :3] = K_gl
    K_cv[:2, 2] -= 0.5  # OpenCV: pixel centres at integer coordinates
    cv_from_gl = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    scale_mat = torch.diag(torch.tensor([NEUS_SCALE, NEUS_SCALE, NEUS_SCALE, 1.0], dtype=torch.float64))

    def fill(tmp: Path) -> None:
        sc = scene or default_scene()
        (tmp / "image").mkdir(parents=True)
        (tmp / "mask").mkdir()
        cams = {}
        for i, c2w in enumerate(hemisphere_cameras(n_views, 0.0, z_range=(-0.9, 0.95))):
            stop.check(f"generating the scene's views ({i + 1} of {n_views})")
            rgba = render_view(sc, c2w, image_size, supersample)
            rgb = rgba[..., :3] * rgba[..., 3:]
            Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB").save(tmp / "image" / f"{i:03d}.png")
            Image.fromarray(((rgba[..., 3] > 0.5) * 255).astype(np.uint8), "L").save(tmp / "mask" / f"{i:03d}.png")
            w2c_cv = torch.linalg.inv(c2w @ cv_from_gl)
            cams[f"world_mat_{i}"] = (K_cv @ w2c_cv).numpy()
            cams[f"scale_mat_{i}"] = scale_mat.numpy()
        np.savez(tmp / "cameras_sphere.npz", **cams)

    return write_once(Path(root), params, fill)
