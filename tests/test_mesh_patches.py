"""``data=mesh_patches``: PU-GAN's training protocol on any folder of meshes (src/data/mesh_patches.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from src.data.errors import DataError
from src.data.mesh_patches import MeshPatchesDataModule, nn_spacing_cv
from src.data.point_patches import PatchDraws, draw_input
from src.geometry.mesh_io import read_mesh, write_mesh
from src.data.pu_gan import torus
from tests.conftest import SHARED_DATA

def _dist_to(points: torch.Tensor, cloud: torch.Tensor) -> torch.Tensor:
    """Exact distance of each point to its nearest point of ``cloud`` (cdist's matmul form is ~1e-4 off at 0)."""
    return (points[:, None] - cloud[None]).norm(dim=-1).amin(1)


SMALL = dict(points_per_mesh=512, patches_per_mesh=4, patch_points=128, input_points=32, val_meshes=1, batch_size=2)


def _quad_box_obj(path: Path) -> None:
    """A unit cube written with quad faces (as several of the real OBJ files are)."""
    v = [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
    quads = [(1, 2, 4, 3), (5, 7, 8, 6), (1, 5, 6, 2), (3, 4, 8, 7), (1, 3, 7, 5), (2, 6, 8, 4)]
    path.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in v) + "".join(f"f {a} {b} {c} {d}\n" for a, b, c, d in quads))


@pytest.fixture
def mesh_folder(tmp_path) -> Path:
    import trimesh

    root = tmp_path / "meshes"
    root.mkdir()
    _quad_box_obj(root / "a_box.obj")
    write_mesh(root / "b_torus.off", *torus(), digits=6)
    trimesh.creation.icosphere(3).export(root / "c_sphere.ply")
    return root


def test_meshes_are_read_in_every_format_with_quads_triangulated(mesh_folder):
    verts, faces = read_mesh(mesh_folder / "a_box.obj")
    assert verts.shape == (8, 3) and faces.shape == (12, 3)  # 6 quads -> 12 triangles
    assert read_mesh(mesh_folder / "b_torus.off")[1].shape == torus()[1].shape
    assert read_mesh(mesh_folder / "c_sphere.ply")[1].shape == (1280, 3)


def test_a_bad_mesh_file_is_named(tmp_path):
    bad = tmp_path / "broken.obj"
    bad.write_text("this is not a mesh\n")
    with pytest.raises(DataError, match="broken.obj"):
        read_mesh(bad)
    empty = tmp_path / "empty.off"
    empty.write_text("OFF\n0 0 0\n")
    with pytest.raises(DataError, match="empty.off"):
        read_mesh(empty)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt"):
        read_mesh(tmp_path / "notes.txt")
    dm = MeshPatchesDataModule(str(tmp_path), test_root=None, **SMALL)
    with pytest.raises(DataError, match="broken.obj"):  # the datamodule names the file too
        dm.setup("fit")


def test_patch_normals_are_the_meshes_and_turn_with_the_augmentation(mesh_folder, tmp_path):
    """Each target point carries its triangle's unit normal: on the cube an axis, on the sphere the radius
    (sign by winding); after PU-GAN's random rotation it is still normal to the (rotated) patch: it agrees with
    the normal of a plane fitted to the point's neighbours (|cos| near 1)."""
    from src.models.pu_inn.losses import pca_normals

    dm = MeshPatchesDataModule(str(mesh_folder), cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.setup("fit")
    normals = dm.train_set.normals
    assert normals.shape == dm.train_set.patches.shape
    assert torch.allclose(normals.norm(dim=-1), torch.ones(()), atol=1e-5)
    box = normals[:4].reshape(-1, 3).abs()  # the box's patches (the first mesh by name)
    assert torch.allclose(box.amax(-1), torch.ones(()), atol=1e-5)  # one axis each
    sphere = dm.val_set  # the third mesh, by name, validates
    verts, _ = read_mesh(mesh_folder / "c_sphere.ply")
    assert np.abs(verts).max() <= 1 + 1e-6  # the icosphere is already in its unit sphere: patches keep directions
    item = PatchDraws(dm.train_set.patches, 32, "random", 0, augment=True, normals=normals)[5]
    cos = (pca_normals(item["dense"][None])[0] * item["normals"]).sum(-1).abs()
    assert float(cos.median()) > 0.99, cos
    cos_sphere = (pca_normals(sphere[0]["dense"][None])[0] * sphere[0]["normals"]).sum(-1).abs()
    assert float(cos_sphere.median()) > 0.99, cos_sphere
    with pytest.raises(ValueError, match="normals"):
        PatchDraws(dm.train_set.patches, 32, "random", 0, augment=False, normals=normals[:, :5])


def test_patches_sizes_normalisation_and_fresh_inputs(mesh_folder, tmp_path):
    dm = MeshPatchesDataModule(str(mesh_folder), cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.setup("fit")
    assert dm.train_set.patches.shape == (2 * 4, 128, 3) and dm.val_set.patches.shape == (4, 128, 3)  # 3rd mesh validates
    for dense in dm.train_set.patches:  # unit sphere: centroid at 0, furthest point at distance 1
        assert dense.mean(0).abs().max() < 1e-5 and float(dense.norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-5)
    a = dm.train_set[0]
    assert a["sparse"].shape == (32, 3) and a["dense"].shape == (128, 3)
    plain = PatchDraws(dm.train_set.patches, 32, "nonuniform", 0, augment=False, passes=2)
    first = plain[3]
    again = PatchDraws(dm.train_set.patches, 32, "nonuniform", 0, augment=False, passes=2)[3]
    assert torch.equal(first["sparse"], again["sparse"])  # a pure function of (seed, item)
    same_patch = [j for j in range(16) if plain.patch_of(j) == plain.patch_of(3) and j != 3][0]
    other = plain[same_patch]
    assert not torch.equal(first["sparse"], other["sparse"])  # drawn afresh for each item
    for item in (first, other):  # inputs are points of their patch, in the input's unit sphere (as test patches)
        assert _dist_to(item["sparse"], item["dense"]).max() < 1e-6
        assert item["sparse"].mean(0).abs().max() < 1e-5
        assert float(item["sparse"].norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-5)
    in_target = PatchDraws(dm.train_set.patches, 32, "nonuniform", 0, augment=False, passes=2, normalize="target")[3]
    assert torch.equal(in_target["dense"], dm.train_set.patches[plain.patch_of(3)])  # PU-GAN's frame: the target's
    assert float(in_target["sparse"].norm(dim=-1).max()) < 1.0 - 1e-3  # a non-uniform input spans less of it
    with pytest.raises(ValueError, match="data.normalize"):
        MeshPatchesDataModule(str(mesh_folder), normalize="patch", **SMALL)
    assert {plain.patch_of(j) for j in range(8)} == set(range(8))  # each pass visits every patch once
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["sparse"].shape == (2, 32, 3) and batch["dense"].shape == (2, 128, 3)
    assert batch["normals"].shape == (2, 128, 3)


def test_patches_are_cached_with_a_key_and_deterministic(mesh_folder, tmp_path, monkeypatch):
    import src.data.mesh_patches as mp

    cache = tmp_path / "cache"
    first, _, first_normals = MeshPatchesDataModule(str(mesh_folder), cache_dir=str(cache), **SMALL).patches()
    (file,) = cache.glob(f"patches_v{mp.CACHE_VERSION}_*.pt")
    monkeypatch.setattr(mp, "mesh_patches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
    cached, _, cached_normals = MeshPatchesDataModule(str(mesh_folder), cache_dir=str(cache), **SMALL).patches()
    assert torch.equal(cached, first) and torch.equal(cached_normals, first_normals)
    monkeypatch.undo()
    fresh = MeshPatchesDataModule(str(mesh_folder), cache_dir=str(tmp_path / "other"), **SMALL).patches()[0]
    assert torch.equal(fresh, first)  # the same seed makes the same patches
    other_seed = MeshPatchesDataModule(str(mesh_folder), cache_dir=str(cache), seed=1, **SMALL).patches()[0]
    assert not torch.equal(other_seed, first) and len(list(cache.glob(f"patches_v{mp.CACHE_VERSION}_*.pt"))) == 2  # a new key


def test_nonuniform_inputs_are_as_uneven_as_pu_gans_test_inputs():
    """Nearest-neighbour spacing CV of the drawn inputs: PU-GAN's nonuniform draw ~0.3-0.4 like the test inputs
    (about 0.32 on the shared PU-GAN inputs), a farthest-point subset ~0.1 (the old generated patches)."""
    from src.data.mesh_patches import mesh_patches

    verts, faces = torus()
    patches, _ = mesh_patches(verts, faces, 4096, 4, 1024, seed=0)
    cv = {m: np.mean([nn_spacing_cv(PatchDraws(patches, 256, m, 0, False)[j]["sparse"]) for j in range(8)])
          for m in ("nonuniform", "random", "fps")}
    assert cv["fps"] < 0.2 and 0.25 < cv["nonuniform"] < 0.5 and 0.25 < cv["random"] < 0.5, cv
    test_dir = SHARED_DATA / "pu_gan" / "test"
    if test_dir.is_dir():  # the real test inputs, when ../shared/data has them
        from src.data.point_patches import load_test_shapes

        real = np.mean([nn_spacing_cv(s["input"]) for s in load_test_shapes(test_dir)])
        assert abs(cv["nonuniform"] - real) < 0.1, (cv, real)


def test_input_sampling_modes_and_bad_mode():
    g = torch.Generator().manual_seed(0)
    idx = draw_input(1024, 256, "nonuniform", g)
    assert len(idx) == 256 == len(set(idx.tolist())) and idx.min() >= 0 and idx.max() < 1024
    with pytest.raises(ValueError, match="input_sampling"):
        MeshPatchesDataModule("/nowhere", input_sampling="poisson")


def test_pu_gan_data_draws_its_inputs_from_poisson_1024(tmp_path):
    from src.data.pu_gan import PUGANDataModule

    dm = PUGANDataModule(str(tmp_path / "pu"), generate={"n_meshes": 2, "patches_per_mesh": 4, "n_test": 1,
                                                        "n_test_points": 256}, augment=False)
    dm.setup("fit")
    a, b = dm.train_set[0], dm.train_set[dm.train_set.patches.shape[0]]
    assert a["sparse"].shape == (256, 3) and a["dense"].shape == (1024, 3)
    assert _dist_to(a["sparse"], a["dense"]).max() < 1e-6
    same = [j for j in range(1, 16) if dm.train_set.patch_of(j) == dm.train_set.patch_of(0)][0]
    assert not torch.equal(dm.train_set[same]["sparse"], a["sparse"])


def test_mesh_patches_config_composes_and_points_at_the_data_layout(make_cfg):
    cfg = make_cfg("model=pu_inn", "data=mesh_patches")
    assert cfg.data.root.endswith("/pu_train_meshes") and cfg.data.test_root.endswith("/PU-GAN/test")
    assert cfg.data.input_sampling == "random" and cfg.data.normalize == "input"  # PU-Flow's inputs, the test frame
    assert cfg.data.patch_points == 1024 and cfg.data.input_points == 256


# a job that makes a shared cache: waits for the start signal (so two jobs really start together), then asks
_CACHE_JOB = """
import logging, sys, time
from pathlib import Path
import torch
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
what, root, cache, out, go = sys.argv[1:6]
while not Path(go).exists():
    time.sleep(0.01)
if what == "patches":
    from src.data.mesh_patches import MeshPatchesDataModule
    patches, names, normals = MeshPatchesDataModule(root, cache_dir=cache, points_per_mesh=4096, patches_per_mesh=8,
                                                    patch_points=512, input_points=128).patches()
    torch.save({"patches": patches, "normals": normals}, out)
else:
    from src.data.pu_gan import write_pu_dataset
    folder = write_pu_dataset(root, n_meshes=3, patches_per_mesh=4, n_test=1, n_test_points=512)
    torch.save({p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}, out)
"""


def _two_jobs_at_once(tmp_path: Path, what: str, root: Path, cache: Path) -> list[tuple[int, str, dict]]:
    import subprocess
    import sys
    import time

    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_JOB, what, str(root), str(cache), str(tmp_path / f"out{i}.pt"),
                               str(go)], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    time.sleep(5)  # both have imported torch and are polling for the signal
    go.touch()
    results = []
    for i, p in enumerate(procs):
        _, err = p.communicate(timeout=600)
        results.append((p.returncode, err, torch.load(tmp_path / f"out{i}.pt") if p.returncode == 0 else {}))
    return results


@pytest.mark.slow
def test_two_jobs_making_the_same_patch_cache_at_once_get_one_complete_cache(mesh_folder, tmp_path):
    """Two processes ask for the same (not yet cached) patches at the same moment: one makes them under the lock,
    the other waits and reads its cache; both get identical patches, one cache file, no error, no temporary left."""
    cache = tmp_path / "cache"
    (a_rc, a_err, a), (b_rc, b_err, b) = _two_jobs_at_once(tmp_path, "patches", mesh_folder, cache)
    assert a_rc == 0 and b_rc == 0, a_err[-2000:] + b_err[-2000:]
    assert torch.equal(a["patches"], b["patches"]) and torch.equal(a["normals"], b["normals"])
    made = [sum(line.startswith("patches of ") for line in err.splitlines()) for err in (a_err, b_err)]
    assert sorted(made) == [0, 3], made  # one job made the 3 meshes' patches, the other made none
    assert len(list(cache.glob("patches_*.pt"))) == 1 and not list(cache.glob(".*.tmp*"))
    assert sum("waiting for another process" in err for err in (a_err, b_err)) == 1


@pytest.mark.slow
def test_two_jobs_generating_the_same_scene_at_once_get_one_complete_scene(tmp_path):
    """The generated datasets (here PU-GAN's layout) are written once under a lock and renamed into place: two jobs
    started together both succeed and read byte-identical files, and only one generated them."""
    root = tmp_path / "pu"
    (a_rc, a_err, a), (b_rc, b_err, b) = _two_jobs_at_once(tmp_path, "scene", root, tmp_path / "unused")
    assert a_rc == 0 and b_rc == 0, a_err[-2000:] + b_err[-2000:]
    assert a == b and "scene.json" in a and "pu_patches.h5" in a
    assert sum("generating the procedural scene" in err for err in (a_err, b_err)) == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("content", ["empty", "no meshes"])
def test_a_mesh_folder_without_meshes_stops_with_an_error_naming_it(tmp_path, content):
    """``data=mesh_patches`` on an empty folder, or on one without any mesh file: an error naming ``data.root``
    and what is there, before anything is cached or written."""
    root = tmp_path / "meshes"
    root.mkdir()
    if content == "no meshes":
        (root / "readme.txt").write_text("meshes go here")
        (root / "scans").mkdir()
        (root / "scans" / "notes.md").write_text("x")
    dm = MeshPatchesDataModule(str(root), test_root=None, cache_dir=str(tmp_path / "cache"), **SMALL)
    dm.prepare_data()
    expect = "it is empty" if content == "empty" else "found only: readme.txt, scans"
    with pytest.raises(DataError, match=rf"data.root={root}: no mesh files \(.*\) in it or its subfolders \({expect}\)"):
        dm.setup("fit")
    assert not (tmp_path / "cache").exists()
