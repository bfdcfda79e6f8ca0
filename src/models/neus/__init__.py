from src.models.neus.module import NeuSModule

__all__ = ["NeuSModule"]
