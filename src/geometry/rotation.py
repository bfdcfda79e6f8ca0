"""Euler angles to rotation matrices, batched (pytorch3d's ``euler_angles_to_matrix`` convention); random
rotations for generated data."""
from __future__ import annotations

import functools

import numpy as np
import torch


def axis_rotation(axis: str, angle: torch.Tensor) -> torch.Tensor:
    """Rotation by ``angle`` (...,) about the X, Y or Z axis (right-handed), (..., 3, 3)."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    rows = {"X": (one, zero, zero, zero, c, -s, zero, s, c),
            "Y": (c, zero, s, zero, one, zero, -s, zero, c),
            "Z": (c, -s, zero, s, c, zero, zero, zero, one)}
    if axis not in rows:
        raise ValueError(f"axis must be X, Y or Z, got {axis!r}")
    return torch.stack(rows[axis], -1).reshape(angle.shape + (3, 3))


def euler_angles_to_matrix(angles: torch.Tensor, convention: str = "XYZ") -> torch.Tensor:
    """Angles (..., 3) -> R (..., 3, 3) = R_a(angles[0]) @ R_b(angles[1]) @ R_c(angles[2]) for convention "abc"
    (intrinsic rotations; scipy's ``Rotation.from_euler("XYZ", ...)``). Uses pytorch3d's when importable."""
    if angles.shape[-1] != 3 or len(convention) != 3:
        raise ValueError(f"need (..., 3) angles and a 3-letter convention, got {tuple(angles.shape)}, {convention!r}")
    try:
        from pytorch3d.transforms import euler_angles_to_matrix as p3d
    except ImportError:
        return functools.reduce(torch.matmul, [axis_rotation(a, t) for a, t in zip(convention, angles.unbind(-1))])
    return p3d(angles, convention)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation (3, 3): QR of a Gaussian matrix, signs fixed, determinant +1."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q
