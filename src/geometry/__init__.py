"""Geometry shared by the methods, one home per concept: mesh and point files (``mesh_io``), points on meshes
(``sampling``: area-uniform, farthest-point, even samples), surfaces from fields and the ico-sphere (``mesh``), a
method's mesh and its score (``meshing``), Chamfer / F-score (``metrics``), PU-GAN's benchmark metrics
(``pu_metrics``), nearest neighbours (``knn``), cameras (``camera``) and rotations (``rotation``)."""
from src.geometry.mesh import extract_mesh, icosphere, mesh_area
from src.geometry.mesh_io import read_mesh, read_xyz, write_mesh
from src.geometry.metrics import chamfer_fscore, nearest_distances
from src.geometry.sampling import even_surface_sample, farthest_point_sample, sample_points, sample_surface

__all__ = ["extract_mesh", "icosphere", "mesh_area", "read_mesh", "read_xyz", "write_mesh",
           "chamfer_fscore", "nearest_distances", "even_surface_sample", "farthest_point_sample", "sample_points",
           "sample_surface"]
