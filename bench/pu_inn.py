"""PU-INN at the PU-GAN benchmark (2048 -> 8192 points) on PU-GAN test pairs, beside the references a reader
needs to judge it: the input alone, the even-sample floor, PU-GAN's own outputs, two no-learning midpoint
baselines and the preset's own network untrained; the trained preset under three test protocols; and an ablation
table that undoes one design choice at a time at a shorter training length. Each CD is also split into its halves
(accuracy and coverage), and the ablations print the val patches' CD beside the input alone's and how far the flow
moves the new points (``val/flow_offset``), so a reader sees what each choice buys.

Usage:
  python bench/pu_inn.py --meshes MESHES --test-dir TESTS              # trains experiment=pu_inn_meshes_cpu, then
                                                                       # the ablations, then writes the tables
  python bench/pu_inn.py ... --full-run RUN                            # score an existing run of the preset
  python bench/pu_inn.py ... --ablation-steps 0                        # no ablations
  python bench/pu_inn.py ... --work DIR                                # runs kept in DIR (default bench/work/pu_inn):
                                                                       # a finished run is reused, so it restarts
Writes bench/results/pu_inn_<cpu|gpu>.md.

MESHES: a folder of training meshes (OBJ / OFF / PLY); TESTS: PU-GAN test pairs (``<name>.xyz`` beside
``<name>.off``). PU-GAN's outputs are read from ``TESTS/../test_outputs/<name>.xyz`` when that folder exists.

Every cloud is scored by ``src.models.pu_inn.module.score_shape`` against an even 8192-point sample of the mesh
(farthest-point thinning of 8x as many area samples, seed 0): CD, HD, P2F x1e-3 on unit-sphere-normalised
clouds; HD as PU-GAN's evaluate.py sums it (the two directions' largest squared distances). The floor is a second
even sample (seed 1) scored the same way: no cloud of that size scores much lower. "closed" is the share of the
distance from the input alone to the floor that a cloud closes, (input - cloud) / (input - floor). The networks
upsample by patches, and one layout of the patches scores several percent apart from another, so each network
row is the mean over ``--layouts`` layouts (``upsample_layouts``), with the spread beside it. A second table moves
each upsampled cloud's points onto the mesh (their closest points; an oracle) and scores it again, so a reader
sees how much of each CD is error off the surface and how much is the layout on it (gaps left open).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from _common import CUDA, ROOT, device_name, emit  # bench/_common.py

from src.data.point_patches import load_test_shapes
from src.geometry.knn import knn_points
from src.geometry.mesh_io import read_xyz
from src.geometry.pu_metrics import cd_hd, closest_points_on_mesh
from src.geometry.sampling import even_surface_sample, farthest_point_sample
from src.models.pu_inn.module import PUINNModule, ground_truth, score_shape, upsample_layouts
from src.models.pu_inn.network import gather

PRESET = "experiment=pu_inn_meshes_cpu"
BARS = {"Icosahedron": 0.55, "fandisk": 0.28}  # CD x1e-3 the CPU preset is held to on the shared test pairs
# (name, what it changes, overrides) - each trained for --ablation-steps beside the reference of the same length
ABLATIONS = [
    ("reference", "the preset as shipped", []),
    ("mixed decode context", "each new point decoded with the weights' mix of its neighbours' contexts (the flow "
     "cancels to first order; the design before) instead of its parent's", ["model.net.decode_context=mixed"]),
    ("rank weight head", "convex weights from each point's feature by neighbour rank (the head before) instead of "
     "per (point, neighbour) pair", ["model.net.interp=point"]),
    ("two EdgeConvs", "features from two EdgeConv layers (before) instead of three densely connected ones with the "
     "patch's pooled feature", ["model.net.features=edge2"]),
    ("no refinement", "no learnt xyz step after decoding", ["model.net.refine=false"]),
    ("target frame", "training pairs in the dense target's unit sphere (PU-GAN's loader; before) instead of the "
     "sparse input's, which is the frame test patches are upsampled in", ["data.normalize=target"]),
    ("PU-GAN's inputs", "non-uniform training inputs (PU-GAN's sampling; before) instead of random subsets (PU-Flow's)",
     ["data.input_sampling=nonuniform"]),
    ("PU-Flow's loss weights", "PU-Flow's balance: EMD beside CD and the NLL at its weight (1e-4 of its per-cloud NLL "
     "= 1.6 per point here), no uniform term", ["model.w_emd=100", "model.w_nll=1.6", "model.w_uniform=0"]),
    ("no more_up", "4 candidates a point (net.more_up=0) instead of 16 farthest-point sampled to 4",
     ["model.net.more_up=0"]),
    ("no surface term", "no point-to-plane term on the candidates (model.w_surface=0): CD and the uniform term alone "
     "place them", ["model.w_surface=0"]),
    ("stronger surface term", "the point-to-plane term at 1000 instead of 300", ["model.w_surface=1000"]),
]
# test protocols the trained preset is scored under (``upsample_shape`` options over the preset's; no training)
PROTOCOLS = [
    ("the preset's: PU-GAN's patching (ratio 3), the 32 points farthest from the input dropped (PU-Flow)", {}),
    ("PU-GAN's: patch ratio 3, nothing dropped", {"n_outliers": 0}),
    ("PU-Flow's: patch ratio 4, inputs merged, the 32 points farthest from the input dropped",
     {"patch_ratio": 4.0, "merge_input": True, "n_outliers": 32}),
    ("statistical outlier removal (8 neighbours, 3 std) before thinning", {"outlier_std": 3.0, "n_outliers": 0}),
]


def onto_mesh(pred: torch.Tensor, shape: dict, gt: torch.Tensor) -> dict:
    """CD of a cloud with each point moved to its closest point of the shape's mesh: an oracle no upsampler has,
    which removes the error off the surface and leaves what the cloud's layout on it costs (coverage)."""
    v, f = torch.as_tensor(shape["verts"]).double(), torch.as_tensor(shape["faces"])
    return cd_hd(closest_points_on_mesh(pred.double(), v, f)[0], gt)


def run_preset(run_dir: Path, overrides: list[str], meshes: Path, test_dir: Path, cache: Path, layouts: int) -> dict:
    """Train and test the preset with ``overrides`` in ``run_dir`` unless it already holds a finished run; its
    metrics, its per-shape test scores (means over ``layouts`` patch layouts) and its module."""
    if not (run_dir / "test_scores.json").is_file():
        cmd = [sys.executable, "train.py", PRESET, f"data.root={meshes}", f"data.cache_dir={cache}",
               f"data.test_root={test_dir}", f"model.test_layouts={layouts}", f"hydra.run.dir={run_dir}", "logger=csv",
               "trainer.enable_progress_bar=false", *(["trainer.accelerator=gpu"] if CUDA else []), *overrides]
        print("+", " ".join(cmd[1:]), flush=True)
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = {s["name"]: {k[5:]: v / 1e3 for k, v in s.items() if k.startswith("test/")}
              for s in json.loads((run_dir / "test_scores.json").read_text())}
    return {"scores": scores, "steps": metrics["train/steps"], "train_s": metrics["time/train_s"],
            "val_cd": metrics.get("val/cd"), "val_cd_input": metrics.get("val/cd_input"),
            "flow_offset": metrics.get("val/flow_offset"), "dir": run_dir}


def midpoints(points: torch.Tensor, k: int = 16, r: int = 4) -> torch.Tensor:
    """No learning: the input and the midpoints to each point's ``k - 1`` nearest inputs, farthest-point sampled
    to r N (with k 16: the preset's candidates at its initialisation, without a network; k 32 reaches further into
    the input's holes)."""
    x = points.double()[None]
    cand = torch.cat([x, 0.5 * (gather(x, knn_points(x, x, k)[1])[:, :, 1:] + x[:, :, None]).reshape(1, -1, 3)], 1)[0]
    return cand[farthest_point_sample(cand, r * points.shape[0])]


def preset_module(seed: int | None = None) -> PUINNModule:
    """The preset's module as ``train.py`` builds it, at its initialisation: composed from conf/ and made after
    seeding with the run's seed (default the config's), so it is the trained run's starting point."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[PRESET])
    L.seed_everything(cfg.seed if seed is None else seed, verbose=False)
    return instantiate(cfg.model, _convert_="all").eval()


def closed(inp: float, floor: float, x: float) -> str:
    return f"{(inp - x) / (inp - floor) * 100:.0f}%"


def cd_cell(s: dict) -> str:
    """CD (its halves) +- its spread over layouts, x1e-3."""
    spread = f" +- {s['cd_std'] * 1e3:.3f}" if "cd_std" in s else ""
    return f"{s['cd'] * 1e3:.3f}{spread} ({s['cd_pred_to_gt'] * 1e3:.3f} / {s['cd_gt_to_pred'] * 1e3:.3f})"


def hd_cell(s: dict) -> str:
    return f"{s['hd'] * 1e3:.2f}" + (f" +- {s['hd_std'] * 1e3:.2f}" if "hd_std" in s else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", required=True, help="training meshes (data.root)")
    p.add_argument("--test-dir", required=True, help="PU-GAN test pairs (data.test_root)")
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "pu_inn"), help="where runs are kept")
    p.add_argument("--full-run", default=None, help="an existing run of the preset to score instead of training one")
    p.add_argument("--layouts", type=int, default=4, help="patch layouts each network is scored in (mean, spread)")
    p.add_argument("--ablation-steps", type=int, default=300, help="training steps of each ablation run (0: none)")
    p.add_argument("--ablations", default=None,
                   help="comma-separated names of the ablation rows to run (default all: " + ", ".join(n for n, _, _ in ABLATIONS) + ")")
    p.add_argument("--out", default=None, help="result file (default bench/results/pu_inn_<cpu|gpu>.md)")
    a = p.parse_args()
    chosen = None if a.ablations is None else [x.strip() for x in a.ablations.split(",")]
    unknown = sorted(set(chosen or []) - {n for n, _, _ in ABLATIONS})
    if unknown:
        raise SystemExit(f"--ablations: no such row {unknown}; rows: {[n for n, _, _ in ABLATIONS]}")
    meshes, test_dir, work = Path(a.meshes).resolve(), Path(a.test_dir).resolve(), Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shapes = load_test_shapes(test_dir)
    names = [s["name"] for s in shapes]
    outputs_dir = test_dir.parent / "test_outputs"
    gts = {s["name"]: ground_truth(s["verts"], s["faces"], 4 * s["input"].shape[0]) for s in shapes}  # made once

    inp_row, floor_row = "input alone (2048 points)", "even-sample floor (a second even sample)"
    untrained_row = f"PU-INN untrained (`{PRESET}` at its initialisation)"
    rows: dict[str, dict[str, dict]] = {}
    clouds: dict[str, dict[str, torch.Tensor]] = {}  # one cloud per row and shape, for the onto-the-mesh table
    init = preset_module()
    for s in shapes:
        gt = gts[s["name"]]
        made = {inp_row: s["input"], floor_row: even_surface_sample(s["verts"], s["faces"], gt.shape[0], seed=1)}
        if (outputs_dir / f"{s['name']}.xyz").is_file():
            made["PU-GAN's own outputs"] = torch.from_numpy(read_xyz(outputs_dir / f"{s['name']}.xyz")).float()
        made["no learning: input + midpoints to its 15 nearest, farthest-point sampled"] = midpoints(s["input"], k=16)
        made["no learning: input + midpoints to its 31 nearest, farthest-point sampled"] = midpoints(s["input"], k=32)
        for row, cloud in made.items():
            rows.setdefault(row, {})[s["name"]] = score_shape(cloud, s["verts"], s["faces"], gt=gt)
            clouds.setdefault(row, {})[s["name"]] = cloud
        with torch.no_grad():
            layout_clouds, rows.setdefault(untrained_row, {})[s["name"]] = upsample_layouts(
                init.net, s, a.layouts, gt, **init.test_protocol)
        clouds.setdefault(untrained_row, {})[s["name"]] = layout_clouds[0]
        print(s["name"], {k: v[s["name"]]["cd"] * 1e3 for k, v in rows.items()}, flush=True)
    inp, floor = rows[inp_row], rows[floor_row]

    full = run_preset(Path(a.full_run).resolve() if a.full_run else work / "full", [], meshes, test_dir,
                      work / "patch_cache", a.layouts)
    model_row = f"PU-INN, `{PRESET}` ({full['steps']} steps, {full['train_s'] / 60:.1f} min training)"
    trained = PUINNModule.load_from_checkpoint(full["dir"] / "checkpoints" / "final.ckpt", map_location="cpu").eval()
    clouds[model_row] = {}
    protocols = {}
    for label, opts in PROTOCOLS:
        protocols[label] = {}
        for s in shapes:
            with torch.no_grad():
                layout_clouds, protocols[label][s["name"]] = upsample_layouts(
                    trained.net, s, a.layouts, gts[s["name"]], **{**trained.test_protocol, **opts})
            clouds[model_row].setdefault(s["name"], layout_clouds[0])
        print(label, {n: v["cd"] * 1e3 for n, v in protocols[label].items()}, flush=True)
    rows[model_row] = protocols[PROTOCOLS[0][0]]  # scored here, in layouts, whatever the run's own test did

    command = (f"python bench/pu_inn.py --meshes {a.meshes} --test-dir {a.test_dir}"
               + (f" --work {a.work}" if a.work != p.get_default("work") else "")
               + (f" --full-run {a.full_run}" if a.full_run else "") + f" --layouts {a.layouts}"
               + f" --ablation-steps {a.ablation_steps}" + (f" --ablations '{a.ablations}'" if a.ablations else ""))
    lines = [f"Device: {device_name()}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`{command}`", "",
             f"Test pairs: {', '.join(names)} (2048 input points each, upsampled x4 to 8192). Ground truth: an even "
             "8192-point sample of each mesh. CD, HD, P2F x1e-3 on unit-sphere-normalised clouds (HD: the two "
             "directions' largest squared distances summed, as PU-GAN's evaluate.py); closed: the share of the "
             f"input-to-floor distance closed. PU-INN rows: the mean over {a.layouts} layouts of the test patches "
             "(the input's own order, then random orders: the patch seeds start elsewhere), +- the spread (std) over "
             "them.", "",
             "CD is the sum of its two halves: pred->gt (accuracy: how far the points lie from the surface's sample) "
             "and gt->pred (coverage: how far the surface's sample lies from the points, high where gaps stay open).", "",
             "| cloud | shape | CD (pred->gt / gt->pred) | HD | P2F (std) | CD closed |", "|---|---|---|---|---|---|"]
    for row, scores in rows.items():
        for n in names:
            s = scores[n]
            lines.append(f"| {row} | {n} | {cd_cell(s)} | {hd_cell(s)} | {s['p2f'] * 1e3:.2f} ({s['p2f_std'] * 1e3:.2f}) | "
                         f"{closed(inp[n]['cd'], floor[n]['cd'], s['cd'])} |")

    before, after = rows[untrained_row], rows[model_row]
    verdict = "; ".join(
        f"{n}: CD {after[n]['cd'] * 1e3:.3f} (bar {BARS[n]}: {'met' if after[n]['cd'] * 1e3 <= BARS[n] else 'not met'}), "
        f"{(1 - after[n]['cd'] / before[n]['cd']) * 100:.0f}% below the untrained network (bar 15%), HD "
        f"{after[n]['hd'] * 1e3:.2f} (bar 5)" for n in names if n in BARS)
    offset = (f" val/flow_offset: {full['flow_offset']:.3f} (the median distance the flow moves a new point off the "
              "convex mix of its neighbours, in units of its parent's spacing)." if full.get("flow_offset") is not None else "")
    lines += ["", f"The trained preset against the bars set for it: {verdict}.{offset}", "",
              "The trained preset under other test protocols (same checkpoint, no training; mean +- spread over "
              "layouts): CD x1e-3 (pred->gt / gt->pred) and HD.", "",
              "| test protocol | " + " | ".join(f"{n} CD | {n} HD" for n in names) + " |", "|---|" + "---|---|" * len(names)]
    for label, by_shape in protocols.items():
        lines.append(f"| {label} | " + " | ".join(f"{cd_cell(by_shape[n])} | {hd_cell(by_shape[n])}" for n in names) + " |")

    lines += ["", "Off the surface or badly laid out on it? The same clouds (for PU-INN, the first layout's) with each "
              "point moved to its closest mesh point (an oracle no upsampler has): what is left is coverage, the layout "
              "on the surface. CD x1e-3 (pred->gt / gt->pred).", "",
              "| cloud | " + " | ".join(f"{n} CD | {n} CD, moved onto the mesh" for n in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for row, by_shape in clouds.items():
        cells = []
        for n in names:
            raw = cd_hd(by_shape[n].double(), gts[n])
            o = onto_mesh(by_shape[n], shapes[names.index(n)], gts[n])
            cells += [f"{raw['cd'] * 1e3:.3f} ({raw['cd_pred_to_gt'] * 1e3:.3f} / {raw['cd_gt_to_pred'] * 1e3:.3f})",
                      f"{o['cd'] * 1e3:.3f} ({o['cd_pred_to_gt'] * 1e3:.3f} / {o['cd_gt_to_pred'] * 1e3:.3f})"]
        lines.append(f"| {row} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)

    if a.ablation_steps > 0:
        s_ = a.ablation_steps
        short = [f"model.iters={s_}", f"model.lr_decay_every={max(1, s_ * 5 // 7)}",
                 f"trainer.val_check_interval={s_}", f"callbacks.model_checkpoint.every_n_train_steps={s_}"]
        lines += ["", f"Ablations: each undoes one design choice of the preset and trains {s_} steps (lr x0.3 at "
                  f"{max(1, s_ * 5 // 7)}), beside the reference of the same length. CD x1e-3 (mean +- spread over "
                  f"{a.layouts} layouts; its halves) and HD. val CD: on the validation mesh's patches (1024 targets from "
                  "256 inputs, x1e-3), with the input alone's in brackets; flow offset: val/flow_offset; s/step: "
                  "training seconds a step.", "",
                  "| run | what it changes | " + " | ".join(f"{n} CD | {n} HD" for n in names)
                  + " | val CD (input alone) | flow offset | s/step |",
                  "|---|---|" + "---|---|" * len(names) + "---|---|---|"]
        for name, what, overrides in ABLATIONS:
            if chosen is not None and name not in chosen:
                continue
            r = run_preset(work / f"ablation_{s_}_{name.replace(' ', '_').replace(chr(39), '')}", short + overrides,
                           meshes, test_dir, work / "patch_cache", a.layouts)
            cells = [f"{cd_cell(r['scores'][n])} | {hd_cell(r['scores'][n])}" for n in names]
            val = (f"{r['val_cd'] * 1e3:.2f} ({r['val_cd_input'] * 1e3:.2f})" if r.get("val_cd_input") is not None
                   else "-")
            off = f"{r['flow_offset']:.3f}" if r.get("flow_offset") is not None else "-"
            lines.append(f"| {name} (`{' '.join(overrides) or PRESET}`) | {what} | {' | '.join(cells)} | {val} | {off} | "
                         f"{r['train_s'] / r['steps']:.2f} |")
            print(lines[-1], flush=True)
    emit("\n".join(lines), "pu_inn", a.out)


if __name__ == "__main__":
    main()
