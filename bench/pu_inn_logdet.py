"""Which log-det estimator ``validation_step`` should use: each estimator's value of the flow's log-det per
point on validation patches, against the exact one (``slogdet`` of the 3 x 3 Jacobian), over repeated draws.

Usage:
  python bench/pu_inn_logdet.py --ckpt RUN/checkpoints/final.ckpt   # a trained PU-INN (its val patches)
  python bench/pu_inn_logdet.py                                     # an untrained PU-INN, generated patches
Writes bench/results/pu_inn_logdet_<cpu|gpu>.md.

Per estimator, on one batch of validation patches (the NLL's points: the sparse inputs, each with its own
feature as context), ``--draws``
independent evaluations: the batch-mean log-det's bias against exact (mean over draws, with its standard
error), its spread from draw to draw (std: what ``val/logdet`` and ``val/nll`` swing by), the spread of the
per-point error, and the time of one evaluation (median). ``poisson (one length per batch)`` is the older
behaviour: every point shared one series length.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import CUDA, device_name, emit, sync  # bench/_common.py

from src.models.pu_inn.module import PUINNModule

ROWS = [("exact", {}), ("exact_trace (10 terms)", {"name": "exact_trace"}), ("fixed (Hutchinson, 10 terms)", {"name": "fixed"}),
        ("poisson (length per point)", {"name": "poisson"}), ("geometric (length per point)", {"name": "geometric"}),
        ("poisson (one length per batch)", {"name": "poisson", "roulette": "batch"})]


def val_batch(cfg, n_patches: int) -> dict:
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("fit")
    items = [dm.val_set[i] for i in range(min(n_patches, len(dm.val_set)))]
    return {k: torch.stack([it[k] for it in items]) for k in ("sparse", "dense")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a PU-INN checkpoint (default: an untrained model)")
    p.add_argument("--patches", type=int, default=16, help="validation patches in the batch (256 input points each)")
    p.add_argument("--draws", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    if a.ckpt:
        from src.run_config import load_run_config

        cfg, _ = load_run_config(a.ckpt)
        module = PUINNModule.load_from_checkpoint(a.ckpt, map_location="cpu")
        batch = val_batch(cfg, a.patches)
        source = f"checkpoint {a.ckpt}"
    else:
        from src.data.pu_gan import PUPatches, write_pu_dataset
        import tempfile

        module = PUINNModule()
        tmp = Path(tempfile.mkdtemp())
        write_pu_dataset(tmp, n_meshes=2, patches_per_mesh=a.patches, n_test=1)
        ds = PUPatches(tmp / "train" / "pu_patches.h5")
        items = [ds[i] for i in range(a.patches)]
        batch = {k: torch.stack([it[k] for it in items]) for k in ("sparse", "dense")}
        source = "an untrained PU-INN (conf/model/pu_inn.yaml) on generated patches"
    net = module.net.to(device).eval()
    net.refresh(50)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        feat = net.features(batch["sparse"])[0]
    ctx = feat.reshape(-1, feat.shape[-1])
    x = batch["sparse"].reshape(-1, 3)

    def evaluate(name: str) -> torch.Tensor:
        return net.flow(x, ctx, estimator=name)[1].detach()

    exact = evaluate("exact")
    lines = [f"Device: {device_name()}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`python bench/pu_inn_logdet.py{' --ckpt ' + a.ckpt if a.ckpt else ''}`", "",
             f"Model: {source}; {len(net.blocks)} flow blocks; {x.shape[0]} input points ({a.patches} patches); "
             f"exact log-det {float(exact.mean()):.4f} nats per point (batch mean). {a.draws} draws per random "
             "estimator. Bias: mean over draws of (batch-mean estimate - exact), +- its standard error; spread: std "
             "of the batch mean over draws; per-point error std: over points and draws.", "",
             "| estimator | bias (nats/point) | spread of the batch mean | per-point error std | time per evaluation (ms) |",
             "|---|---|---|---|---|"]
    for label, opts in ROWS:
        name = opts.get("name", "exact")
        for b in net.blocks:
            b.roulette = opts.get("roulette", "point")
        deterministic = name in ("exact", "exact_trace")
        means, errs, times = [], [], []
        for _ in range(1 if deterministic else a.draws):
            sync()
            tic = time.perf_counter()
            est = evaluate(name)
            sync()
            times.append(time.perf_counter() - tic)
            means.append(float(est.mean()))
            errs.append(est - exact)
        for _ in range(2 if deterministic else 0):  # deterministic ones: time a few more calls
            sync()
            tic = time.perf_counter()
            evaluate(name)
            sync()
            times.append(time.perf_counter() - tic)
        bias = statistics.fmean(means) - float(exact.mean())
        spread = statistics.stdev(means) if len(means) > 1 else 0.0
        se = spread / len(means) ** 0.5
        per_point = float(torch.cat(errs).std()) if not deterministic else float(torch.cat(errs).abs().max())
        lines.append(f"| {label} | {bias:+.4f} +- {se:.4f} | {spread:.4f} | {per_point:.4f}"
                     f"{' (max abs)' if deterministic else ''} | {1e3 * statistics.median(times):.0f} |")
    for b in net.blocks:
        b.roulette = "point"
    emit("\n".join(lines), "pu_inn_logdet", a.out)


if __name__ == "__main__":
    main()
