"""PU-INN (point-cloud upsampling with an invertible residual flow). So far: the residual-flow blocks and
their log-determinant estimators (``flow.py``); the upsampler, PU-GAN data and metrics are still to come."""
from src.models.pu_inn.flow import ESTIMATORS, ResidualBlock, SpectralNormLinear

__all__ = ["ESTIMATORS", "ResidualBlock", "SpectralNormLinear"]
