"""Where PU-INN's gap is: how far each part of the upsampler can go on one fixed batch of training patches.

Usage:
  python bench/pu_inn_capacity.py --meshes MESHES [--steps 300] [--oracle-steps 1500] [--cache DIR]
Writes bench/results/pu_inn_capacity_<cpu|gpu>.md.

One batch of 8 training patches of ``data=mesh_patches`` (256 non-uniform inputs, 1024 even targets, seed 0) is
fitted by each of these with Adam. The network rows train on the module's own training loss as configured
(100 x CD + 10 x uniform + 0.01 x NLL; no NLL without a flow), the oracle rows on 100 x CD:
- the network's interpolation head with no flow (``net.n_blocks=0``: the convex weights act on xyz), by rank
  (``interp=point``, the default) and per pair (``interp=pair``), ``--steps`` steps at lr 1e-3: what the head
  can fit even when it may overfit this one batch;
- the full network (4 flow blocks, NLL and uniform terms as trained), ``--steps`` steps;
- an oracle of the same form: free convex weights for every (point, new point, neighbour), r = 4 over the 16
  nearest inputs, ``--oracle-steps`` steps at lr 0.05: how far convex interpolation of neighbours can reach;
- free points (r copies of each input, moved freely): a floor for 1024 points against these targets.
The input alone is the starting mark. CD x1e-3 on the patches' unit-sphere frame, its two halves beside it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import device_name, emit  # bench/_common.py

from src.data.mesh_patches import MeshPatchesDataModule
from src.geometry.knn import chamfer, knn_points
from src.models.pu_inn.module import PUINNModule
from src.models.pu_inn.network import gather


def halves(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean over the batch of CD's halves: pred->target (accuracy), target->pred (coverage)."""
    return float(knn_points(pred, target, 1)[0].mean()), float(knn_points(target, pred, 1)[0].mean())


def fit(params, loss_of, make, steps: int, lr: float) -> tuple[torch.Tensor, float]:
    """Adam on ``loss_of()`` for ``steps`` steps; then ``make()`` (the prediction) and the seconds taken."""
    opt = torch.optim.Adam(params, lr=lr)
    tic = time.perf_counter()
    for _ in range(steps):
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return make().detach(), time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", required=True, help="training meshes (data.root of data=mesh_patches)")
    p.add_argument("--cache", default=None, help="patch cache folder (data.cache_dir)")
    p.add_argument("--steps", type=int, default=300, help="steps for the network rows")
    p.add_argument("--oracle-steps", type=int, default=1500, help="steps for the oracle rows")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    dm = MeshPatchesDataModule(root=a.meshes, cache_dir=a.cache, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=8)))
    sparse, target = batch["sparse"], batch["dense"]
    b, n, _ = sparse.shape
    rows = [("input alone (256 points)", sparse, 0, 0.0)]

    for name, net_kw in [("head alone, by rank (`interp=point`, no flow)", {"n_blocks": 0}),
                         ("head alone, per pair (`interp=pair`, no flow)", {"n_blocks": 0, "interp": "pair"}),
                         ("full network (`interp=point`, 4 flow blocks)", {})]:
        torch.manual_seed(0)  # the training loss as configured (conf/model/pu_inn.yaml); no NLL without a flow
        module = PUINNModule(net=net_kw, **({"w_nll": 0.0} if net_kw.get("n_blocks") == 0 else {}))

        def make(module=module):
            return module.net(sparse)["dense"]

        with torch.no_grad():
            rows.append((f"{name}, untrained", make(), 0, 0.0))
        pred, secs = fit(list(module.parameters()), lambda module=module: module._losses(batch)["loss"], make,
                         a.steps, 1e-3)
        rows.append((name, pred, a.steps, secs))
        print(rows[-1][0], halves(pred, target), f"{secs:.0f} s", flush=True)

    nb = gather(sparse, knn_points(sparse, sparse, 16)[1])  # (B, N, 16, 3)
    logits = torch.zeros(b, n, 4, 16)
    logits[..., 0] = 2.0
    logits = (logits + 0.5 * torch.randn_like(logits)).requires_grad_(True)
    def convex():
        return torch.einsum("bnrk,bnkc->bnrc", logits.softmax(-1), nb).reshape(b, -1, 3)

    pred, secs = fit([logits], lambda: 100 * chamfer(convex(), target).mean(), convex, a.oracle_steps, 0.05)
    rows.append(("oracle: free convex weights over the 16 nearest inputs, r = 4", pred, a.oracle_steps, secs))
    free = (sparse[:, :, None].expand(-1, -1, 4, -1) + 0.01 * torch.randn(b, n, 4, 3)).reshape(b, -1, 3)
    free = free.clone().requires_grad_(True)
    pred, secs = fit([free], lambda: 100 * chamfer(free, target).mean(), lambda: free, a.oracle_steps, 0.003)
    rows.append(("free points (1024, moved freely)", pred, a.oracle_steps, secs))

    lines = [f"Device: {device_name()}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`python bench/pu_inn_capacity.py --meshes {a.meshes} --steps {a.steps} --oracle-steps {a.oracle_steps}`",
             "", f"One batch of {b} training patches of `{Path(a.meshes).name}` ({n} non-uniform inputs, "
             f"{target.shape[1]} even targets each), fitted by each row on that batch alone. CD x1e-3 (unit-sphere "
             "patch frame) and its halves: pred->target (accuracy), target->pred (coverage).", "",
             "| fitted by | steps | CD | pred->target | target->pred | s |", "|---|---|---|---|---|---|"]
    for name, pred, steps, secs in rows:
        f, bwd = halves(pred, target)
        lines.append(f"| {name} | {steps} | {(f + bwd) * 1e3:.2f} | {f * 1e3:.2f} | {bwd * 1e3:.2f} | {secs:.0f} |")
    emit("\n".join(lines), "pu_inn_capacity", a.out)


if __name__ == "__main__":
    main()
