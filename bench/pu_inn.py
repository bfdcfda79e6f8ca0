"""PU-INN at the PU-GAN benchmark (2048 -> 8192 points) on PU-GAN test pairs, beside the references a reader
needs to judge it: the input alone, the even-sample floor, PU-GAN's own outputs; and an ablation table that
undoes one change of issue 14 at a time at a shorter training length. Each CD is also split into its halves
(accuracy and coverage), and the ablations print the val patches' CD beside the input alone's, so a reader sees
where the rest of the gap is.

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
clouds; HD as PU-GAN's evaluate.py sums it (the two directions' largest squared distances). The floor is a second even sample (seed 1) scored the same way: no cloud of that size scores much
lower. "closed" is the share of the distance from the input alone to the floor that a cloud closes,
(input - cloud) / (input - floor), for CD and HD. P2F has no such share: the inputs lie on the surface
(P2F 0), so any upsampler can only add to it. A second table moves each upsampled cloud's points onto the mesh
(their closest points; an oracle) and scores it again, so a reader sees how much of each CD is error off the surface
and how much is the layout on it (gaps left open).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import CUDA, ROOT, device_name, emit  # bench/_common.py

from src.data.pu_gan import load_test_shapes
from src.geometry.knn import knn_points
from src.geometry.pu_metrics import (cd_hd, closest_points_on_mesh, even_surface_sample, farthest_point_sample,
                                     read_xyz)
from src.models.pu_inn.module import ground_truth, score_shape, upsample_shape
from src.models.pu_inn.network import PUINN, gather

PRESET = "experiment=pu_inn_meshes_cpu"
# (name, what it undoes, overrides) - each trained for --ablation-steps beside the reference of the same length
ABLATIONS = [
    ("reference", "the preset as shipped", []),
    ("even inputs", "training inputs an even (farthest-point) subset, as before issue 14", ["data.input_sampling=fps"]),
    ("no uniform loss", "PU-GAN's uniform term off", ["model.w_uniform=0"]),
    ("truncated gradient", "inverse gradient unrolled 5 steps instead of the implicit one",
     ["model.net.inverse_grad=unrolled"]),
    ("generated meshes", "trained on 16 generated primitives (data=synthetic_pu, 32 patches each) instead of real meshes",
     ["data=synthetic_pu", "data.generate.n_meshes=16", "data.generate.patches_per_mesh=32"]),
    # options tried after issue 14's changes
    ("no more_up", "4 candidates a point (net.more_up=0, the preset before) instead of 16 farthest-point sampled to 4",
     ["model.net.more_up=0"]),
    ("reach 31", "32 candidates a point (the point and, at the start, the midpoints to its 31 nearest; net.k 32, "
     "more_up 28) instead of 16; 5.6x slower a step on 2 CPU cores", ["model.net.k=32", "model.net.more_up=28"]),
]


def saved_cloud(run_dir: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(read_xyz(run_dir / "test_points" / f"{name}.xyz")).double()


def onto_mesh(pred: torch.Tensor, shape: dict, gt: torch.Tensor) -> dict:
    """CD of a cloud with each point moved to its closest point of the shape's mesh: an oracle no upsampler has,
    which removes the error off the surface and leaves what the cloud's layout on it costs (coverage)."""
    v, f = torch.as_tensor(shape["verts"]).double(), torch.as_tensor(shape["faces"])
    return cd_hd(closest_points_on_mesh(pred.double(), v, f)[0], gt)


def run_preset(run_dir: Path, overrides: list[str], meshes: Path, test_dir: Path, cache: Path,
               gts: dict[str, torch.Tensor]) -> dict:
    """Train and test the preset with ``overrides`` in ``run_dir`` unless it already holds a finished run. CD (with
    its halves) and HD are taken again from the saved test clouds (``test_points/<name>.xyz``) by the current metric
    code against ``gts`` (each shape's ``ground_truth``, as ``score_shape`` makes it): a reused run's table then
    never mixes definitions."""
    if not (run_dir / "test_scores.json").is_file():
        mesh_args = [] if "data=synthetic_pu" in overrides else [f"data.root={meshes}", f"data.cache_dir={cache}"]
        cmd = [sys.executable, "train.py", PRESET, *mesh_args, f"data.test_root={test_dir}",
               f"paths.data_dir={run_dir.parent / 'generated'}", f"hydra.run.dir={run_dir}", "logger=csv",
               "trainer.enable_progress_bar=false", *(["trainer.accelerator=gpu"] if CUDA else []), *overrides]
        print("+", " ".join(cmd[1:]), flush=True)
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = {s["name"]: {k[5:]: v / 1e3 for k, v in s.items() if k.startswith("test/")}
              for s in json.loads((run_dir / "test_scores.json").read_text())}
    for name, gt in gts.items():
        scores[name].update(cd_hd(saved_cloud(run_dir, name), gt))
    return {"scores": scores, "steps": metrics["train/steps"], "train_s": metrics["time/train_s"],
            "val_cd": metrics.get("val/cd"), "val_cd_input": metrics.get("val/cd_input")}


def midpoints(points: torch.Tensor, k: int = 16, r: int = 4) -> torch.Tensor:
    """No learning: the input and the midpoints to each point's ``k - 1`` nearest inputs, farthest-point sampled
    to r N (with k 16: the preset's candidates at its initialisation, without a network; k 32 reaches further into
    the input's holes)."""
    x = points.double()[None]
    cand = torch.cat([x, 0.5 * (gather(x, knn_points(x, x, k)[1])[:, :, 1:] + x[:, :, None]).reshape(1, -1, 3)], 1)[0]
    return cand[farthest_point_sample(cand, r * points.shape[0])]


def untrained(seed: int = 0) -> tuple[PUINN, dict]:
    """The preset's network at its initialisation (``seed``) and its test options, composed from conf/."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[PRESET])
    torch.manual_seed(seed)
    m = cfg.model
    return PUINN(**m.net).eval(), dict(patch_size=m.patch_size, patch_ratio=m.patch_ratio,
                                       merge_input=m.merge_input, outlier_std=m.outlier_std)


def closed(inp: float, floor: float, x: float) -> str:
    return f"{(inp - x) / (inp - floor) * 100:.0f}%"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meshes", required=True, help="training meshes (data.root)")
    p.add_argument("--test-dir", required=True, help="PU-GAN test pairs (data.test_root)")
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "pu_inn"), help="where runs are kept")
    p.add_argument("--full-run", default=None, help="an existing run of the preset to score instead of training one")
    p.add_argument("--ablation-steps", type=int, default=500, help="training steps of each ablation run (0: none)")
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

    refs: dict[str, dict[str, dict]] = {"input alone (2048 points)": {}, "even-sample floor (a second even sample)": {}}
    clouds: dict[str, dict[str, torch.Tensor]] = {}  # the upsampled clouds, for the onto-the-mesh table
    mid = "no learning: input + midpoints to its {} nearest, farthest-point sampled"
    net, opts = untrained()
    gts = {s["name"]: ground_truth(s["verts"], s["faces"], 4 * s["input"].shape[0]) for s in shapes}  # made once
    for s in shapes:
        gt = gts[s["name"]]
        refs["input alone (2048 points)"][s["name"]] = score_shape(s["input"], s["verts"], s["faces"], gt=gt)
        refs["even-sample floor (a second even sample)"][s["name"]] = score_shape(
            even_surface_sample(s["verts"], s["faces"], gt.shape[0], seed=1), s["verts"], s["faces"], gt=gt)
        made = {}
        if (outputs_dir / f"{s['name']}.xyz").is_file():
            made["PU-GAN's own outputs"] = torch.from_numpy(read_xyz(outputs_dir / f"{s['name']}.xyz")).float()
        made[mid.format(15)] = midpoints(s["input"], k=16)
        made[mid.format(31)] = midpoints(s["input"], k=32)
        with torch.no_grad():
            made[f"PU-INN untrained (`{PRESET}` at its initialisation, seed 0)"] = upsample_shape(net, s["input"], **opts)
        for row, cloud in made.items():
            refs.setdefault(row, {})[s["name"]] = score_shape(cloud, s["verts"], s["faces"], gt=gt)
            clouds.setdefault(row, {})[s["name"]] = cloud
        print(s["name"], {k: v.get(s["name"]) for k, v in refs.items()}, flush=True)
    inp, floor = refs["input alone (2048 points)"], refs["even-sample floor (a second even sample)"]

    full_dir = Path(a.full_run).resolve() if a.full_run else work / "full"
    full = run_preset(full_dir, [], meshes, test_dir, work / "patch_cache", gts)
    model_row = f"PU-INN, `{PRESET}` ({full['steps']} steps, {full['train_s'] / 60:.0f} min training)"
    rows = {**refs, model_row: full["scores"]}
    clouds[model_row] = {n: saved_cloud(full_dir, n) for n in names}

    command = (f"python bench/pu_inn.py --meshes {a.meshes} --test-dir {a.test_dir}"
               + (f" --work {a.work}" if a.work != p.get_default("work") else "")
               + (f" --full-run {a.full_run}" if a.full_run else "") + f" --ablation-steps {a.ablation_steps}"
               + (f" --ablations '{a.ablations}'" if a.ablations else ""))
    lines = [f"Device: {device_name()}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M')} by "
             f"`{command}`", "",
             f"Test pairs: {', '.join(names)} (2048 input points each, upsampled x4 to 8192). Ground truth: an even "
             "8192-point sample of each mesh. CD, HD, P2F x1e-3 on unit-sphere-normalised clouds (HD: the two directions' "
             "largest squared distances summed, as PU-GAN's evaluate.py); closed: the share "
             "of the input-to-floor distance closed.", "",
             "CD is the sum of its two halves: pred->gt (accuracy: how far the points lie from the surface's sample) "
             "and gt->pred (coverage: how far the surface's sample lies from the points, high where gaps stay open).", "",
             "| cloud | shape | CD | CD pred->gt | CD gt->pred | HD | P2F (std) | CD closed | HD closed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, scores in rows.items():
        for n in names:
            if n not in scores:
                continue
            s = scores[n]
            halves = " | ".join(f"{s[h] * 1e3:.3f}" if h in s else "-" for h in ("cd_pred_to_gt", "cd_gt_to_pred"))
            lines.append(f"| {row} | {n} | {s['cd'] * 1e3:.3f} | {halves} | {s['hd'] * 1e3:.2f} | {s['p2f'] * 1e3:.2f} "
                         f"({s['p2f_std'] * 1e3:.2f}) | {closed(inp[n]['cd'], floor[n]['cd'], s['cd'])} | "
                         f"{closed(inp[n]['hd'], floor[n]['hd'], s['hd'])} |")

    lines += ["", "Off the surface or badly laid out on it? The same clouds with each point moved to its closest mesh "
              "point (an oracle no upsampler has): what is left is coverage, the layout on the surface. CD x1e-3 "
              "(pred->gt / gt->pred).", "",
              "| cloud | " + " | ".join(f"{n} CD | {n} CD, moved onto the mesh" for n in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for row, by_shape in clouds.items():
        cells = []
        for n in names:
            if n not in by_shape:
                cells += ["-", "-"]
                continue
            s = rows[row][n]
            o = onto_mesh(by_shape[n], shapes[names.index(n)], gts[n])
            cells += [f"{s['cd'] * 1e3:.3f} ({s['cd_pred_to_gt'] * 1e3:.3f} / {s['cd_gt_to_pred'] * 1e3:.3f})",
                      f"{o['cd'] * 1e3:.3f} ({o['cd_pred_to_gt'] * 1e3:.3f} / {o['cd_gt_to_pred'] * 1e3:.3f})"]
        lines.append(f"| {row} | {' | '.join(cells)} |")
        print(lines[-1], flush=True)

    if a.ablation_steps > 0:
        s_ = a.ablation_steps
        short = [f"model.iters={s_}", f"model.lr_decay_every={max(1, s_ * 5 // 7)}",
                 f"trainer.val_check_interval={s_}", f"callbacks.model_checkpoint.every_n_train_steps={s_}"]
        lines += ["", f"Ablations: each undoes one change of issue 14 (or adds one option tried after it) and trains {s_} steps (lr x0.3 at "
                  f"{max(1, s_ * 5 // 7)}), beside the reference of the same length. CD x1e-3 (CD closed; its gt->pred "
                  "half). val CD: on the validation mesh's patches (1024 targets from 256 inputs, x1e-3), with the "
                  "input alone's in brackets.", "",
                  "| run | what it changes | " + " | ".join(f"{n} CD" for n in names) + " | val CD (input alone) | steps |",
                  "|---|---|" + "---|" * len(names) + "---|---|"]
        for name, what, overrides in ABLATIONS:
            if chosen is not None and name not in chosen:
                continue
            r = run_preset(work / f"ablation_{s_}_{name.replace(' ', '_')}", short + overrides, meshes, test_dir,
                           work / "patch_cache", gts)
            cells = [f"{r['scores'][n]['cd'] * 1e3:.3f} ({closed(inp[n]['cd'], floor[n]['cd'], r['scores'][n]['cd'])}; "
                     + (f"{r['scores'][n]['cd_gt_to_pred'] * 1e3:.3f})" if "cd_gt_to_pred" in r["scores"][n] else "-)")
                     for n in names]
            val = (f"{r['val_cd'] * 1e3:.2f} ({r['val_cd_input'] * 1e3:.2f})" if r.get("val_cd_input") is not None
                   else "-")
            lines.append(f"| {name} (`{' '.join(overrides) or PRESET}`) | {what} | {' | '.join(cells)} | {val} | {r['steps']} |")
            print(lines[-1], flush=True)
    emit("\n".join(lines), "pu_inn", a.out)


if __name__ == "__main__":
    main()
