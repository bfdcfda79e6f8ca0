"""Mesh and point-cloud files, through trimesh: any OBJ / OFF / PLY read as triangles, written in the format a file's suffix names,
ASCII point clouds (``.xyz``) read. A file that is not what it should be raises
:class:`~src.data.errors.DataError` naming it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from src.data.errors import DataError

MESH_SUFFIXES = (".obj", ".off", ".ply")


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 and triangles (F, 3) int64 of an OBJ / OFF / PLY file (quads and polygons
    triangulated by trimesh, vertices kept as stored); a file that is not a usable triangle mesh raises
    :class:`DataError` naming it."""
    import trimesh

    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise DataError(f"{path}: not a mesh file this loader reads ({', '.join(MESH_SUFFIXES)})")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as err:  # noqa: BLE001 - trimesh raises many types for bad files: name the file
        raise DataError(f"{path}: cannot read the mesh ({type(err).__name__}: {err})") from err
    verts = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    if len(faces) == 0 or len(verts) < 3:
        raise DataError(f"{path}: no triangles in the file ({len(verts)} vertices, {len(faces)} faces)")
    if not np.isfinite(verts).all():
        raise DataError(f"{path}: non-finite vertex coordinates")
    area = np.linalg.norm(np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]]), axis=1)
    if not area.sum() > 0:
        raise DataError(f"{path}: every triangle is degenerate (zero area)")
    return verts, faces


def write_mesh(path: str | Path, verts: np.ndarray, faces: np.ndarray, digits: int | None = None) -> Path:
    """Triangles to ``path`` in the format its suffix names (binary PLY, OFF, OBJ, STL; trimesh's writers), the
    vertices as given (``digits``: decimals of a text format's coordinates). Returns the path."""
    import trimesh

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh = trimesh.Trimesh(np.asarray(verts, dtype=np.float64).reshape(-1, 3),
                           np.asarray(faces, dtype=np.int64).reshape(-1, 3), process=False)
    kwargs = {"digits": digits} if digits is not None and path.suffix.lower() in (".off", ".obj") else {}
    mesh.export(path, **kwargs)
    return path


def read_xyz(path: str | Path) -> np.ndarray:
    """An ASCII point cloud (N, 3), one point a line (the first three columns); a malformed file raises
    :class:`DataError` naming it."""
    path = Path(path)
    try:
        pts = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: malformed XYZ ({err})") from err
    if pts.shape[1] < 3:
        raise DataError(f"{path}: expected 3 columns per line, got {pts.shape[1]}")
    return pts[:, :3]
