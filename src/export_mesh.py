"""Mesh a trained run from its checkpoint: ``python -m src.export_mesh RUN_DIR [--ckpt PATH] [--resolution N]
[--threshold T] [--out mesh.ply]``.

The run's ``config.yaml`` names the model and data; the model is restored from ``checkpoints/final.ckpt``
(or ``--ckpt``), its geometry field triangulated by marching cubes and written in world coordinates; on
generated scenes the Chamfer distance and F-score to the exact surface are printed too."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import src.config  # noqa: F401  (resolvers used by saved configs)
from src.geometry.meshing import export_mesh, score_against_truth


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--ckpt", type=Path, default=None, help="default: RUN_DIR/checkpoints/final.ckpt")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--threshold", type=float, default=None, help="level of the field (default: the model's)")
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/mesh_<resolution>.ply")
    p.add_argument("--n-points", type=int, default=30000)
    p.add_argument("--fscore-threshold", type=float, default=0.02)
    a = p.parse_args(argv)
    cfg_path = a.run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise SystemExit(f"{cfg_path} not found: RUN_DIR must be a run directory written by train.py")
    cfg = OmegaConf.load(cfg_path)
    ckpt = a.ckpt or a.run_dir / "checkpoints" / "final.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"checkpoint not found: {ckpt}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = get_class(cfg.model._target_).load_from_checkpoint(ckpt, map_location=device)
    if not model.meshes:
        raise SystemExit(f"{cfg.model._target_} has no geometry field to mesh")
    if a.threshold is not None:
        model.hparams.mesh_threshold = a.threshold
    dm = instantiate(cfg.data)
    dm.setup("test")
    out = a.out or a.run_dir / f"mesh_{a.resolution}.ply"
    verts, faces = export_mesh(model, dm, out, a.resolution)
    result = {"mesh": str(out), "vertices": len(verts), "faces": len(faces)}
    result.update(score_against_truth(verts, faces, dm, a.n_points, a.fscore_threshold) or {})
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
