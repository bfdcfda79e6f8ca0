"""PU-GAN data (Li et al., ICCV 2019) and a generated stand-in in the same layout.

Training patches: one HDF5 file with ``poisson_256`` (P, 256, 3) sparse inputs and ``poisson_1024`` (P, 1024, 3)
dense targets, float32, in each patch's original coordinates; the loader normalises every pair by the
target's centroid and furthest distance (as PU-GAN's loader). Test data: meshes ``<name>.off`` and their
2048-point inputs ``<name>.xyz``.

The generated version: simple meshes (icospheres, boxes, tori, cylinders) at random scales and rotations;
patches are the 2048 of 16384 dense surface samples nearest to a farthest-point seed (an eighth of the
surface, as a 256-point test patch of a 2048-point input), thinned by farthest-point sampling to 1024 (the
target, an even sample) and to 256 (the input); test inputs are 2048 even samples.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from src import stop
from src.data.cache import write_once
from src.data.errors import DataError, missing_root
from src.data.loaders import eval_loader
from src.data.point_patches import PatchDraws, augment, check_normalize, draw_input, load_test_shapes
from src.geometry.mesh import icosphere
from src.geometry.mesh_io import write_mesh
from src.geometry.pu_metrics import normalize_unit_sphere
from src.geometry.rotation import random_rotation
from src.geometry.sampling import even_surface_sample, farthest_point_sample, sample_surface


# ---------------------------------------------------------------------------------------------- meshes
def grid_surface(fn, nu: int, nv: int, wrap_u: bool, wrap_v: bool) -> tuple[np.ndarray, np.ndarray]:
    """Triangulated parametric surface ``fn(u, v)`` on [0, 1]^2 (wrapped where the surface closes)."""
    us = np.linspace(0, 1, nu, endpoint=not wrap_u)
    vs = np.linspace(0, 1, nv, endpoint=not wrap_v)
    U, V = np.meshgrid(us, vs, indexing="ij")
    verts = fn(U.ravel(), V.ravel())
    faces = []
    for i in range(nu if wrap_u else nu - 1):
        for j in range(nv if wrap_v else nv - 1):
            a, b = i * nv + j, ((i + 1) % nu) * nv + j
            c, d = i * nv + (j + 1) % nv, ((i + 1) % nu) * nv + (j + 1) % nv
            faces += [[a, b, d], [a, d, c]]
    return verts, np.asarray(faces, dtype=np.int64)


def torus(r_major: float = 0.7, r_minor: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    def fn(u, v):
        a, b = 2 * np.pi * u, 2 * np.pi * v
        return np.stack([(r_major + r_minor * np.cos(b)) * np.cos(a), (r_major + r_minor * np.cos(b)) * np.sin(a),
                         r_minor * np.sin(b)], -1)

    return grid_surface(fn, 48, 24, True, True)


def box(half: tuple[float, float, float] = (0.8, 0.5, 0.3)) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64) * half
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1], [2, 3, 7], [2, 7, 6],
                      [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], dtype=np.int64)
    return corners, faces


def cylinder(radius: float = 0.4, half_h: float = 0.8, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    ang = 2 * np.pi * np.arange(n) / n
    ring = np.stack([radius * np.cos(ang), radius * np.sin(ang)], -1)
    verts = np.concatenate([np.c_[ring, np.full(n, -half_h)], np.c_[ring, np.full(n, half_h)],
                            [[0, 0, -half_h], [0, 0, half_h]]])
    faces = []
    for i in range(n):
        j = (i + 1) % n
        faces += [[i, j, n + j], [i, n + j, n + i], [2 * n, j, i], [2 * n + 1, n + i, n + j]]
    return verts, np.asarray(faces, dtype=np.int64)


def generated_meshes(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` meshes cycling through the shapes, each randomly stretched and rotated."""
    rng = np.random.default_rng(seed)
    makers = [("icosphere", lambda: icosphere(2)), ("torus", torus), ("box", box), ("cylinder", cylinder)]
    out = []
    for i in range(n):
        name, make = makers[i % len(makers)]
        verts, faces = make()
        verts = verts * rng.uniform(0.6, 1.2, size=3) @ random_rotation(rng).T
        out.append((f"{name}_{i}", verts, faces))
    return out


def write_pu_dataset(root: str | Path, n_meshes: int = 8, patches_per_mesh: int = 16, n_test: int = 2,
                     seed: int = 0, n_test_points: int = 2048) -> Path:
    """The generated PU-GAN layout under ``root``: ``train/pu_patches.h5`` and ``test/<name>.{off,xyz}``;
    skipped when an identical copy is there."""
    import h5py

    params = {"format": "pu_gan", "n_meshes": n_meshes, "patches_per_mesh": patches_per_mesh, "n_test": n_test,
              "seed": seed, "n_test_points": n_test_points, "version": 2}

    def fill(tmp: Path) -> None:
        (tmp / "train").mkdir(parents=True)
        (tmp / "test").mkdir()
        sparse, dense = [], []
        for k, (_, verts, faces) in enumerate(generated_meshes(n_meshes, seed)):
            stop.check(f"generating the point-cloud training patches (mesh {k + 1} of {n_meshes})")
            cloud = sample_surface(verts, faces, 16384, seed=seed + k)
            seeds = farthest_point_sample(cloud, patches_per_mesh, start=k)
            for s in seeds:  # an eighth of the surface: the share of a 256-point test patch of a 2048-point input
                near = torch.cdist(cloud[s][None], cloud)[0].topk(2048, largest=False).indices
                region = cloud[near]
                target = region[farthest_point_sample(region, 1024, start=int(s) % 2048)]
                sparse.append(target[farthest_point_sample(target, 256, start=int(s) % 1024)].numpy())
                dense.append(target.numpy())
        with h5py.File(tmp / "train" / "pu_patches.h5", "w") as f:
            f.create_dataset("poisson_256", data=np.stack(sparse).astype(np.float32))
            f.create_dataset("poisson_1024", data=np.stack(dense).astype(np.float32))
        for name, verts, faces in generated_meshes(n_test, seed + 1000):
            write_mesh(tmp / "test" / f"{name}.off", verts, faces, digits=6)
            test_input = even_surface_sample(verts, faces, n_test_points, oversample=4, seed=seed,
                                             start=seed % (4 * n_test_points))
            np.savetxt(tmp / "test" / f"{name}.xyz", test_input.numpy(), fmt="%.6f")

    return write_once(Path(root), params, fill)


# ---------------------------------------------------------------------------------------------- loading
class PUPatches(Dataset):
    """Training pairs from a PU-GAN HDF5 file: (input (256, 3), target (1024, 3)), both normalised by the
    target's centroid and furthest distance. ``augment``: PU-GAN's random rotation, scaling (0.8-1.2) and
    input jitter (sigma 0.005, clipped at 0.015)."""

    KEYS = ("poisson_256", "poisson_1024")

    def __init__(self, path: str | Path, augment: bool = False, seed: int = 0) -> None:
        import h5py

        path = Path(path)
        if not path.is_file():
            raise DataError(f"PU-GAN patch file not found: {path}")
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in self.KEYS if k not in f]
                if missing:
                    raise DataError(f"{path}: missing key(s) {missing} (expected {list(self.KEYS)})")
                sparse, dense = np.asarray(f[self.KEYS[0]]), np.asarray(f[self.KEYS[1]])
        except OSError as err:
            raise DataError(f"cannot read {path}: {err}") from err
        if sparse.shape[0] != dense.shape[0] or sparse.shape[2:] != (3,) or dense.shape[2:] != (3,):
            raise DataError(f"{path}: shapes {sparse.shape} and {dense.shape} are not (P, n, 3) pairs")
        self.sparse, self.dense = torch.from_numpy(sparse).float(), torch.from_numpy(dense).float()
        self.augment, self.seed = augment, seed

    def __len__(self) -> int:
        return self.sparse.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        dense, centre, scale = normalize_unit_sphere(self.dense[i])
        sparse = (self.sparse[i] - centre) / scale
        if self.augment:
            sparse, dense = augment(sparse, dense, torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        return {"sparse": sparse, "dense": dense, "index": i}


class PUGANDataModule(L.LightningDataModule):
    """PU-GAN layout at ``root``: ``train/<train_file>`` (HDF5 patches) and ``test/*.xyz`` + ``*.off``; with
    ``generate`` set, the generated dataset is written there first. The last ``val_fraction`` of the patches
    is held out for validation.

    Training inputs: ``input_sampling=nonuniform`` (default) draws ``input_points`` of each ``poisson_1024`` patch
    afresh for every item by PU-GAN's ``nonuniform_sampling`` (``random``: a random subset, as PU-Flow; ``fps``:
    an even one; see :mod:`src.data.mesh_patches`), as PU-GAN's training loader does; ``file`` reads the fixed
    ``poisson_256`` inputs of the file instead. Validation inputs are drawn once (fixed).

    Args: batch_size: patches per step. augment: PU-GAN's augmentation of training patches. num_workers.
        normalize: the frame of drawn pairs, ``input`` (the sparse input's unit sphere, as test patches are
        upsampled) or ``target`` (PU-GAN's loader; ``file`` inputs always use it).
        test_root: the test inputs and meshes (default ``root/test``): a folder of ``<name>.xyz`` inputs beside ``<name>.off`` meshes.
    """

    def __init__(self, root: str, train_file: str = "pu_patches.h5", batch_size: int = 8, val_fraction: float = 0.1,
                 augment: bool = True, generate: dict | None = None, num_workers: int = 0, seed: int = 0,
                 test_root: str | None = None, input_sampling: str = "random", input_points: int = 256,
                 normalize: str = "input") -> None:
        super().__init__()
        if input_sampling != "file":
            draw_input(8, 4, input_sampling, torch.Generator().manual_seed(0), torch.zeros(8, 3))  # names a bad mode
        self.input_sampling, self.input_points = input_sampling, int(input_points)
        self.normalize = check_normalize(normalize)
        self.root, self.train_file, self.batch_size = Path(root), train_file, int(batch_size)
        self.test_root = Path(test_root) if test_root else self.root / "test"
        self.val_fraction, self.augment, self.generate = val_fraction, augment, generate
        self.num_workers, self.seed = num_workers, seed
        self.train_set = self.val_set = None
        self.test_shapes: list[dict] | None = None
        self.test_split_used = "test"

    def prepare_data(self) -> None:
        if self.generate is not None:
            write_pu_dataset(self.root, **self.generate)
        elif not self.root.is_dir() and not self.test_root.is_dir():  # testing alone needs only the test folder
            raise missing_root(self.root, "PU-GAN data (train/*.h5, test/*.xyz + *.off)")

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if stage in (None, "fit", "validate") and self.train_set is None:
            if not self.root.is_dir():
                raise missing_root(self.root, "PU-GAN training data (train/*.h5)")
            full = PUPatches(self.root / "train" / self.train_file, augment=False, seed=self.seed)
            n_val = max(1, int(round(len(full) * self.val_fraction)))
            idx = torch.arange(len(full))
            if self.input_sampling == "file":
                train = PUPatches(self.root / "train" / self.train_file, augment=self.augment, seed=self.seed)
                self.train_set = torch.utils.data.Subset(train, idx[:-n_val].tolist())
                self.val_set = torch.utils.data.Subset(full, idx[-n_val:].tolist())
            else:
                dense = torch.stack([normalize_unit_sphere(d)[0] for d in full.dense])
                self.train_set = PatchDraws(dense[:-n_val], self.input_points, self.input_sampling, self.seed,
                                            self.augment, passes=10**6, normalize=self.normalize)
                self.val_set = PatchDraws(dense[-n_val:], self.input_points, self.input_sampling, self.seed + 1,
                                          False, passes=1, shuffle=False, normalize=self.normalize)
        if stage in (None, "test") and self.test_shapes is None:
            self.test_shapes = load_test_shapes(self.test_root)

    def train_dataloader(self):
        if self.input_sampling != "file":  # PatchDraws shuffles the patches itself, per pass, from the seed
            return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False,
                                               num_workers=self.num_workers, drop_last=True)
        g = torch.Generator().manual_seed(self.seed)
        sampler = torch.utils.data.RandomSampler(self.train_set, replacement=True, num_samples=10**9, generator=g)
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                                           num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self):
        return eval_loader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self):
        return eval_loader(self.test_shapes, batch_size=None, collate_fn=lambda x: x)
