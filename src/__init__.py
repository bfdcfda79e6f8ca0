"""Neural 3D experiment suite: DVGO, NeRF, NeuS, PU-INN and Proto-Depth on Lightning + Hydra."""
