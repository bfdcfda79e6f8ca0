"""Where a trained PU-INN's error lies on the PU-GAN test shapes: near their sharp edges or away from them, and
what a perfect step onto the surface would leave.

Usage:
  python bench/pu_inn_edges.py --run RUN --test-dir TESTS        # RUN: a finished run of experiment=pu_inn_meshes_cpu
Writes bench/results/pu_inn_edges_<cpu|gpu>.md.

Two tables, one layout of the test patches (the input's own order), the preset's test protocol:

- **Sharp edges.** A mesh edge is sharp where its two faces meet at more than ``--angle`` degrees; a point is near
  one within ``--band`` of the shape's radius. For the run's own test clouds (``RUN/test_points``): the share of
  points near a sharp edge, their share of the squared point-to-surface distance, and their share of the points
  more than 0.01 radius off the surface.
- **Candidates moved onto the mesh before the selection** (an oracle no upsampler has): every candidate of every
  patch moved to its closest mesh point before the farthest-point selection and the merge, beside the same
  upsampling without the move. The gap between the two is what a perfect learnt step onto the surface is worth;
  what the oracle row still misses against the floor is coverage.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _common import device_name, emit  # bench/_common.py

from src.data.point_patches import load_test_shapes
from src.geometry.pu_metrics import cd_hd, closest_points_on_mesh, normalize_unit_sphere, point_triangle_distance
from src.geometry.sampling import even_surface_sample, farthest_point_sample
from src.models.pu_inn.module import PUINNModule, ground_truth, upsample_shape


def sharp_edge_samples(verts: torch.Tensor, faces: torch.Tensor, angle: float, per_edge: int = 8) -> torch.Tensor:
    """Points (M, 3) along every edge whose two faces' normals differ by more than ``angle`` degrees."""
    n = torch.linalg.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    n = n / n.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values  # (3F, 2)
    owner = torch.arange(faces.shape[0]).repeat(3)
    uniq, inv, counts = torch.unique(edges, dim=0, return_inverse=True, return_counts=True)
    order = inv.argsort(stable=True)
    first = torch.zeros(uniq.shape[0], dtype=torch.long).scatter_reduce(0, inv[order], order, "amin", include_self=False)
    last = torch.zeros(uniq.shape[0], dtype=torch.long).scatter_reduce(0, inv[order], order, "amax", include_self=False)
    pair = counts == 2  # manifold edges
    cos = (n[owner[first]] * n[owner[last]]).sum(-1)
    sharp = uniq[pair & (cos < math.cos(math.radians(angle)))]
    if sharp.shape[0] == 0:
        return verts.new_zeros(0, 3)
    t = torch.linspace(0, 1, per_edge, dtype=verts.dtype)[None, :, None]
    return (verts[sharp[:, 0], None] * (1 - t) + verts[sharp[:, 1], None] * t).reshape(-1, 3)


def upsample_onto_mesh(net, shape: dict, protocol: dict) -> torch.Tensor:
    """``upsample_shape`` with every candidate of each patch moved to its closest mesh point (in the shape's frame)
    before the farthest-point selection."""
    verts, faces = torch.as_tensor(shape["verts"]).double(), torch.as_tensor(shape["faces"])

    def onto_mesh(normed: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        centre, scale = centre.double(), scale.double()
        cand = net(normed[None])["candidates"][0].double()
        moved = closest_points_on_mesh(cand * scale + centre, verts, faces)[0]
        moved = ((moved - centre) / scale).float()
        return moved[farthest_point_sample(moved[None], normed.shape[0] * net.up_ratio)[0]]

    return upsample_shape(net, shape["input"], **protocol, patch_fn=onto_mesh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished PU-INN run (checkpoints/final.ckpt, test_points/)")
    p.add_argument("--test-dir", required=True, help="PU-GAN test pairs (<name>.xyz beside <name>.off)")
    p.add_argument("--angle", type=float, default=20.0, help="dihedral angle (degrees) above which an edge is sharp")
    p.add_argument("--band", type=float, default=0.05, help="'near an edge': within this share of the shape's radius")
    p.add_argument("--no-oracle", action="store_true", help="skip the candidates-onto-the-mesh table (minutes)")
    p.add_argument("--out", default=None, help="result file (default bench/results/pu_inn_edges_<cpu|gpu>.md)")
    a = p.parse_args()
    run, shapes = Path(a.run).resolve(), load_test_shapes(a.test_dir)
    command = (f"python bench/pu_inn_edges.py --run {a.run} --test-dir {a.test_dir} --angle {a.angle:g} --band {a.band:g}"
               + (" --no-oracle" if a.no_oracle else ""))
    lines = [f"Device: {device_name()}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`{command}`", "",
             f"Sharp edges: mesh edges whose faces meet at more than {a.angle:g} degrees; near: within {a.band:g} of "
             "the shape's radius. The run's own test clouds (first layout). Point-to-surface distances in the "
             "shape's unit sphere.", "",
             "| shape | sharp edges | points near one | their share of the squared point-to-surface distance | "
             "their share of the points > 0.01 off the surface | P2F median / 90% / 99% (x1e-3) |",
             "|---|---|---|---|---|---|"]
    for s in shapes:
        v, f = torch.as_tensor(s["verts"]).double(), torch.as_tensor(s["faces"]).long()
        _, centre, scale = normalize_unit_sphere(v)
        v = (v - centre) / scale
        cloud = torch.from_numpy(np.loadtxt(run / "test_points" / f"{s['name']}.xyz")).double()
        cloud = (cloud - centre) / scale
        d = point_triangle_distance(cloud, v, f)
        edges = sharp_edge_samples(v, f, a.angle)
        near = torch.cdist(cloud, edges).amin(1) < a.band if edges.shape[0] else torch.zeros_like(d, dtype=torch.bool)
        off = d > 0.01
        q = torch.quantile(d, torch.tensor([0.5, 0.9, 0.99], dtype=d.dtype)) * 1e3
        lines.append(f"| {s['name']} | {edges.shape[0] // 8} | {near.double().mean() * 100:.0f}% | "
                     f"{(d[near] ** 2).sum() / (d ** 2).sum() * 100:.0f}% | "
                     f"{(off & near).sum() / max(1, int(off.sum())) * 100:.0f}% | "
                     f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} |")
        print(lines[-1], flush=True)

    if not a.no_oracle:
        module = PUINNModule.load_from_checkpoint(run / "checkpoints" / "final.ckpt", map_location="cpu").eval()
        if not module.net.more_up:
            raise SystemExit("the oracle table needs candidates (model.net.more_up > 0)")
        lines += ["", "Candidates moved onto the mesh before the selection (oracle), beside the same upsampling without "
                  "the move; one layout, the preset's test protocol. CD x1e-3 (pred->gt / gt->pred) and HD.", "",
                  "| shape | as upsampled | candidates moved onto the mesh | the even-sample floor |", "|---|---|---|---|"]
        for s in shapes:
            gt = ground_truth(s["verts"], s["faces"], module.net.up_ratio * s["input"].shape[0])
            floor = cd_hd(even_surface_sample(s["verts"], s["faces"], gt.shape[0], seed=1).double(), gt)
            with torch.no_grad():
                plain = cd_hd(upsample_shape(module.net, s["input"], **module.test_protocol).double(), gt)
                moved = cd_hd(upsample_onto_mesh(module.net, s, module.test_protocol).double(), gt)
            cell = lambda r: (f"{r['cd'] * 1e3:.3f} ({r['cd_pred_to_gt'] * 1e3:.3f} / {r['cd_gt_to_pred'] * 1e3:.3f}), "
                              f"HD {r['hd'] * 1e3:.2f}")
            lines.append(f"| {s['name']} | {cell(plain)} | {cell(moved)} | {cell(floor)} |")
            print(lines[-1], flush=True)
    emit("\n".join(lines), "pu_inn_edges", a.out)


if __name__ == "__main__":
    main()
