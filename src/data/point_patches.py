"""What both point-upsampling datamodules share (``data=pu_gan``, ``data=mesh_patches``): PU-GAN's augmentation, the
sparse input drawn from a dense patch, the frame a pair is normalised in, the items drawn afresh from patches, and
the test shapes (``<name>.xyz`` inputs beside ``<name>.off`` meshes)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from src.data.errors import DataError
from src.geometry.mesh_io import read_mesh, read_xyz
from src.geometry.pu_metrics import normalize_unit_sphere
from src.geometry.sampling import farthest_point_sample


def augment(sparse: torch.Tensor, dense: torch.Tensor, g: torch.Generator, normals: torch.Tensor | None = None):
    """PU-GAN's augmentation: a random rotation, scaling in [0.8, 1.2], input jitter (sigma 0.005, clip 0.015).
    -> (sparse, dense), and with ``normals`` (the dense points' unit normals) those rotated with them third."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
    rot = q * torch.sign(torch.diagonal(r))
    s = float(torch.empty(1).uniform_(0.8, 1.2, generator=g))
    sparse, dense = sparse @ rot.T * s, dense @ rot.T * s
    sparse = sparse + (torch.randn(sparse.shape, generator=g) * 0.005).clamp(-0.015, 0.015)
    return (sparse, dense) if normals is None else (sparse, dense, normals @ rot.T)


def draw_input(patch_points: int, input_points: int, mode: str, generator: torch.Generator,
               patch: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (input_points,) of the sparse input within a patch of ``patch_points`` (ordered by distance to its
    seed): ``nonuniform`` (PU-GAN), ``random`` or ``fps`` (needs ``patch``)."""
    if mode == "random":
        return torch.randperm(patch_points, generator=generator)[:input_points]
    if mode == "fps":
        start = int(torch.randint(patch_points, (1,), generator=generator))
        return farthest_point_sample(patch, input_points, start=start)
    if mode != "nonuniform":
        raise ValueError(f"data.input_sampling must be nonuniform, random or fps, got {mode!r}")
    # PU-GAN's nonuniform_sampling: loc ~ U(0.1, 0.9), indices ~ N(loc, 0.3) x n, distinct, inside the patch
    loc = float(torch.rand((), generator=generator)) * 0.8 + 0.1
    taken = torch.zeros(patch_points, dtype=torch.bool)
    picked: list[torch.Tensor] = []
    count = 0
    while count < input_points:
        a = ((torch.randn(4 * input_points, generator=generator) * 0.3 + loc) * patch_points).floor().long()
        a = a[(a >= 0) & (a < patch_points)]
        for i in a.tolist():  # first occurrences, in draw order (as PU-GAN's set fills)
            if not taken[i]:
                taken[i] = True
                picked.append(i)
                count += 1
                if count == input_points:
                    break
    return torch.tensor(picked, dtype=torch.long)


NORMALIZE = ("input", "target")


def check_normalize(normalize: str) -> str:
    """``data.normalize`` if it names a frame of :data:`NORMALIZE`, else a ValueError naming the key."""
    if normalize not in NORMALIZE:
        raise ValueError(f"data.normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
    return normalize


class PatchDraws(Dataset):
    """Items ``j = 0, 1, 2, ...`` over patches (N, patch_points, 3): item j is patch ``perm_e[j mod N]`` (a fresh
    permutation each pass ``e = j // N``) with an input drawn for that item alone, both from ``(seed, j)``.
    ``passes``: how many passes the dataset spans (its length is ``passes * N``). ``normalize``: the frame of
    the pair, ``input`` (the sparse input's centroid and furthest distance, after augmentation: the frame a test
    patch is upsampled in, where only the input is known) or ``target`` (the dense patch's unit sphere, as PU-GAN's
    loader; a non-uniform input then spans less than the unit sphere). ``normals``: the patches' unit normals
    (their shape), rotated with the augmentation and handed on as each item's ``normals``."""

    def __init__(self, patches: torch.Tensor, input_points: int, mode: str, seed: int, augment: bool,
                 passes: int = 1, shuffle: bool = True, normalize: str = "input",
                 normals: torch.Tensor | None = None) -> None:
        self.patches, self.input_points, self.mode, self.seed = patches, int(input_points), mode, int(seed)
        if normals is not None and normals.shape != patches.shape:
            raise ValueError(f"normals {tuple(normals.shape)} must match the patches {tuple(patches.shape)}")
        self.normals = normals
        self.augment, self.passes, self.shuffle = augment, int(passes), shuffle
        self.normalize = check_normalize(normalize)
        self._perm: tuple[int, torch.Tensor] | None = None
        draw_input(patches.shape[1], min(4, patches.shape[1]), mode, torch.Generator().manual_seed(0), patches[0])

    def __len__(self) -> int:
        return self.passes * self.patches.shape[0]

    def patch_of(self, j: int) -> int:
        n = self.patches.shape[0]
        if not self.shuffle:
            return j % n
        e = j // n
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7_919 + e)))
        return int(self._perm[1][j % n])

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        i = self.patch_of(j)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
        dense = self.patches[i]
        normals = None if self.normals is None else self.normals[i]
        sparse = dense[draw_input(dense.shape[0], self.input_points, self.mode, g, dense)]
        if self.augment:
            sparse, dense, *rest = augment(sparse, dense, g, normals)
            normals = rest[0] if rest else None
        if self.normalize == "input":
            sparse, centre, scale = normalize_unit_sphere(sparse)
            dense = (dense - centre) / scale
        item = {"sparse": sparse, "dense": dense, "index": i}
        return item if normals is None else {**item, "normals": normals}


def load_test_shapes(folder: str | Path) -> list[dict]:
    """Every ``<name>.xyz`` input with its ``<name>.off`` mesh in ``folder`` (PU-GAN's test layout)."""
    folder = Path(folder)
    inputs = sorted(folder.glob("*.xyz"))
    if not inputs:
        raise DataError(f"no .xyz inputs in {folder}")
    shapes = []
    for xyz in inputs:
        off = xyz.with_suffix(".off")
        if not off.is_file():
            raise DataError(f"{xyz}: its mesh {off.name} is missing")
        verts, faces = read_mesh(off)
        shapes.append({"name": xyz.stem, "input": torch.from_numpy(read_xyz(xyz)).float(), "verts": verts,
                       "faces": faces})
    return shapes
