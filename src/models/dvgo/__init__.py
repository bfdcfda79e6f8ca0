"""DVGO: Direct Voxel Grid Optimization (Sun, Sun and Chen, CVPR 2022)."""
from src.models.dvgo.module import DVGOModule

__all__ = ["DVGOModule"]
