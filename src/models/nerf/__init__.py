from src.models.nerf.module import NeRFModule

__all__ = ["NeRFModule"]
