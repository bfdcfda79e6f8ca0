"""Rendering shared by DVGO, NeRF and NeuS: camera rays, sampling along rays, compositing."""
from src.render.compositing import composite, dense_weights, render_weights
from src.render.rays import get_rays, intrinsics_from_fov, viewdirs_of

__all__ = ["composite", "dense_weights", "render_weights", "get_rays", "intrinsics_from_fov", "viewdirs_of"]
