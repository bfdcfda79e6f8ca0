"""Training patches for point-cloud upsampling made from any folder of meshes, by PU-GAN's protocol.

Per mesh (OBJ / OFF / PLY read by trimesh, polygons triangulated on load): ``points_per_mesh`` even surface
samples (area-uniform samples thinned by farthest-point sampling: close to the Poisson-disk sample PU-GAN
takes with its mesh tools), in the mesh's unit-sphere frame; ``patches_per_mesh`` seeds spread by
farthest-point sampling; each patch the ``patch_points`` samples nearest to its seed, ordered by distance to it
and normalised to the unit sphere (centroid, furthest distance): the dense target, with the mesh's unit normal at
each of its points (the triangle it was sampled on; the loss's point-to-plane term). With the defaults (8192
points a mesh, 1024-point patches) a patch is an eighth of the surface, as a 256-point test patch of a
2048-point PU-GAN input.

The sparse input (``input_points`` of the patch) is drawn afresh for every item: ``nonuniform`` is PU-GAN's
``nonuniform_sampling`` (indices normally distributed, sigma 0.3 of the patch, around a random place in the
patch's distance-to-seed order, so the density falls off across the patch as in PU-GAN's inputs), ``random`` a
uniform random subset (PU-Flow), ``fps`` a farthest-point subset (even). The
draw is a pure function of (seed, item number): the same run draws the same inputs, resumed or not.

The patches are cached on disk on first use (``cache_dir``, one file per setting and mesh set, named by a hash
of both and a format version), so later runs skip the sampling.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from src import stop
from src.data.cache import file_lock, save_atomic
from src.data.errors import DataError, missing_root
from src.data.loaders import eval_loader
from src.data.point_patches import PatchDraws, check_normalize, draw_input, load_test_shapes
from src.geometry.mesh_io import MESH_SUFFIXES, read_mesh
from src.geometry.pu_metrics import normalize_unit_sphere
from src.geometry.sampling import even_surface_sample, farthest_point_sample

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: with the mesh normals
FALLBACK_CACHE = Path.home() / ".cache" / "neural3d" / "patch_cache"  # when the data folder is read-only


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def mesh_patches(verts: np.ndarray, faces: np.ndarray, points_per_mesh: int, patches_per_mesh: int,
                 patch_points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(patches_per_mesh, patch_points, 3) float32 patches of one mesh, each ordered by distance to its seed and
    normalised to the unit sphere (see the module docstring), and the mesh's unit normal at each point (the
    surface term of the loss measures distances along them)."""
    centre = (verts.max(0) + verts.min(0)) / 2
    verts = (verts - centre) / np.linalg.norm(verts - centre, axis=1).max()  # the mesh's own unit sphere
    cloud, normals = even_surface_sample(verts, faces, points_per_mesh, oversample=4, seed=seed, start=None,
                                         dtype=torch.float32, return_normals=True)
    seeds = farthest_point_sample(cloud, patches_per_mesh, start=seed % points_per_mesh)
    near = torch.cdist(cloud[seeds], cloud).topk(patch_points, largest=False).indices  # sorted: nearest first
    return torch.stack([normalize_unit_sphere(cloud[idx])[0] for idx in near]), normals[near]


def nn_spacing_cv(points: torch.Tensor) -> float:
    """Coefficient of variation (std / mean) of each point's distance to its nearest neighbour: about 0.1 for an
    even (farthest-point) sample, about 0.3 for PU-GAN's test inputs."""
    d = torch.cdist(points.double(), points.double())
    d.fill_diagonal_(float("inf"))
    nn = d.amin(1)
    return float(nn.std() / nn.mean())


class MeshPatchesDataModule(L.LightningDataModule):
    """``data=mesh_patches data.root=MESHES data.test_root=TESTS``: training patches from every OBJ / OFF / PLY
    under ``root`` (module docstring), validation on the patches of the last ``val_meshes`` meshes (inputs drawn
    once, fixed), testing on PU-GAN test pairs in ``test_root`` (``<name>.xyz`` inputs beside ``<name>.off``).

    Args: points_per_mesh, patches_per_mesh, patch_points, input_points: the protocol's sizes (PU-GAN: 200
        patches a mesh, 1024 -> 256). input_sampling: nonuniform | random | fps. augment: PU-GAN's augmentation.
        normalize: each pair's frame, ``input`` (the sparse input's unit sphere, as test patches) or ``target``.
        batch_size, num_workers, seed. cache_dir: where the patches are cached (default ``root/.patch_cache``;
        ``~/.cache/neural3d/patch_cache`` when that is not writable).
    """

    def __init__(self, root: str, test_root: str | None = None, points_per_mesh: int = 8192,
                 patches_per_mesh: int = 200, patch_points: int = 1024, input_points: int = 256,
                 input_sampling: str = "random", augment: bool = True, val_meshes: int = 1, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0, cache_dir: str | None = None, normalize: str = "input") -> None:
        super().__init__()
        for key, value in dict(points_per_mesh=points_per_mesh, patches_per_mesh=patches_per_mesh,
                               patch_points=patch_points, input_points=input_points, batch_size=batch_size).items():
            if not value > 0:
                raise ValueError(f"data.{key} must be > 0, got {value!r}")
        if not input_points <= patch_points <= points_per_mesh:
            raise ValueError(f"data.input_points ({input_points}) <= data.patch_points ({patch_points}) <= "
                             f"data.points_per_mesh ({points_per_mesh}) must hold")
        draw_input(8, 4, input_sampling, torch.Generator().manual_seed(0), torch.zeros(8, 3))  # names a bad mode
        self.root = Path(root)
        self.test_root = Path(test_root) if test_root else None
        self.sizes = dict(points_per_mesh=int(points_per_mesh), patches_per_mesh=int(patches_per_mesh),
                          patch_points=int(patch_points))
        self.input_points, self.input_sampling, self.augment = int(input_points), input_sampling, augment
        self.normalize = check_normalize(normalize)
        self.val_meshes, self.batch_size, self.num_workers, self.seed = int(val_meshes), int(batch_size), num_workers, int(seed)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".patch_cache"
        self.train_set = self.val_set = None
        self.test_shapes: list[dict] | None = None
        self.test_split_used = "test"

    def mesh_files(self) -> list[Path]:
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in MESH_SUFFIXES and p.is_file()
                       and self.cache_dir not in p.parents)
        if not files:
            found = sorted(p.name for p in self.root.iterdir() if p != self.cache_dir)[:5] if self.root.is_dir() else []
            raise DataError(f"data.root={self.root}: no mesh files ({', '.join(MESH_SUFFIXES)}) in it or its subfolders"
                            f" ({'it is empty' if not found else 'found only: ' + ', '.join(found)}); point data.root "
                            "at a folder of training meshes")
        return files

    def prepare_data(self) -> None:
        if not self.root.is_dir() and (self.test_root is None or not self.test_root.is_dir()):
            raise missing_root(self.root, "folder of training meshes (OBJ / OFF / PLY)")

    def patches(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """(n_meshes, patches_per_mesh, patch_points, 3) patches of every mesh, the mesh names and the patches'
        unit normals (the patches' shape), from the cache
        when it holds this setting (its key: the sizes, the seed, each file's name, size and mtime, the format
        version), else made and cached."""
        files = self.mesh_files()
        key = {"version": CACHE_VERSION, "seed": self.seed, **self.sizes,
               "files": [[str(f.relative_to(self.root)), f.stat().st_size, int(f.stat().st_mtime)] for f in files]}
        key_text = json.dumps(key, sort_keys=True)
        digest = hashlib.sha1(key_text.encode()).hexdigest()[:16]
        path = self.cache_dir / f"patches_v{CACHE_VERSION}_{digest}.pt"
        hit = self._cached(path, key_text)
        if hit is not None:
            return hit
        folder = next((f for f in (self.cache_dir, FALLBACK_CACHE) if _writable(f)), None)
        if folder is None:  # nowhere to cache (read-only data folder and home): make them for this run only
            log.warning("cannot cache the patches in %s or %s (not writable)", self.cache_dir, FALLBACK_CACHE)
            return self._make(files)
        target = folder / path.name
        with file_lock(folder / f".{path.name}.lock", f"the patch cache {target}"):
            hit = self._cached(path, key_text)  # made by the process that held the lock
            if hit is not None:
                return hit
            patches, names, normals = self._make(files)
            save_atomic({"key": key_text, "patches": patches, "names": names, "normals": normals}, target)
            log.info("cached %d patches of %d meshes in %s", patches.shape[0] * patches.shape[1], len(files), target)
        return patches, names, normals

    @staticmethod
    def _cached(path: Path, key_text: str) -> tuple[torch.Tensor, list[str], torch.Tensor] | None:
        """The patches of the cache file for this key, in the data folder's cache or the user's, if there."""
        for cached in (path, FALLBACK_CACHE / path.name):
            if cached.is_file():
                saved = torch.load(cached, weights_only=True)
                if saved.get("key") == key_text:
                    return saved["patches"], saved["names"], saved["normals"]
        return None

    def _make(self, files: list[Path]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        out, out_normals = [], []
        for k, f in enumerate(files):
            stop.check(f"caching training patches of the meshes ({k + 1} of {len(files)})")
            verts, faces = read_mesh(f)
            pts, normals = mesh_patches(verts, faces, **self.sizes, seed=self.seed * 1_000 + k)
            out.append(pts)
            out_normals.append(normals)
            log.info("patches of %s: %d x %d points (%d of %d meshes)", f.name, *pts.shape[:2], k + 1, len(files))
        return torch.stack(out), [f.stem for f in files], torch.stack(out_normals)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if stage in (None, "fit", "validate") and self.train_set is None:
            if not self.root.is_dir():
                raise missing_root(self.root, "folder of training meshes (OBJ / OFF / PLY)")
            patches, names, normals = self.patches()
            n_val = min(self.val_meshes, len(names) - 1)
            split = len(names) - n_val if n_val > 0 else len(names) - 1  # no mesh to spare: the last validates too
            if n_val > 0:
                log.info("validation meshes: %s", ", ".join(names[split:]))
            train, val = patches[: len(names) - n_val], patches[split:]
            train_n, val_n = normals[: len(names) - n_val], normals[split:]
            self.train_set = PatchDraws(train.flatten(0, 1), self.input_points, self.input_sampling, self.seed,
                                        self.augment, passes=10**6, normalize=self.normalize,
                                        normals=train_n.flatten(0, 1))
            self.val_set = PatchDraws(val.flatten(0, 1), self.input_points, self.input_sampling, self.seed + 1,
                                      False, passes=1, shuffle=False, normalize=self.normalize,
                                      normals=val_n.flatten(0, 1))
        if stage in (None, "test") and self.test_shapes is None:
            if self.test_root is None:
                raise DataError("data.test_root is not set: point it at a folder of PU-GAN test pairs "
                                "(<name>.xyz inputs beside <name>.off meshes)")
            if not self.test_root.is_dir():
                raise missing_root(self.test_root, "PU-GAN test pairs (<name>.xyz beside <name>.off)")
            self.test_shapes = load_test_shapes(self.test_root)

    def train_dataloader(self):
        # items in order: PatchDraws shuffles the patches itself, per pass, from the seed (deterministic per seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          drop_last=True)

    def val_dataloader(self):
        return eval_loader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self):
        return eval_loader(self.test_shapes, batch_size=None, collate_fn=lambda x: x)
