"""Surfaces from fields and how far apart two surfaces are: marching cubes in blocks, PLY files, area-weighted
surface samples, Chamfer distance and F-score."""
from src.geometry.mesh import extract_mesh, mesh_area, read_ply, sample_surface, write_ply
from src.geometry.metrics import chamfer_fscore, nearest_distances

__all__ = ["extract_mesh", "mesh_area", "read_ply", "sample_surface", "write_ply", "chamfer_fscore",
           "nearest_distances"]
