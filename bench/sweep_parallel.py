"""Two training jobs on this machine: one after the other, a ``hydra/launcher=joblib`` sweep of both at once (each
job gets ``cores // n_jobs`` torch threads: ``src.process.share_cores_in_parallel_sweeps``), and, for contrast,
two plain ``train.py`` processes started together (each takes every core). Prints a table and writes it to
``bench/results/sweep_parallel_<cpu|gpu>.md``.

    python bench/sweep_parallel.py [--experiment dvgo_smoke] [--data-dir DIR]

Needs ``pip install -e ".[sweep]"`` (hydra-joblib-launcher). Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit  # noqa: E402


def _train_s(run_dir: Path) -> list[float]:
    return [json.loads(p.read_text())["time/train_s"] for p in sorted(run_dir.rglob("metrics.json"))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="dvgo_smoke")
    ap.add_argument("--data-dir", default=None, help="paths.data_dir for the generated scene (default: a temp dir)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = a.data_dir or str(tmp / "data")
        common = [f"experiment={a.experiment}", f"paths.data_dir={data}", "trainer.enable_progress_bar=false",
                  "logger=none"]
        # generate the scene once, outside the timings
        subprocess.run([sys.executable, "-c", "import sys; sys.argv=['x']; from hydra import compose, initialize_config_dir;"
                        "from hydra.utils import instantiate; import src.config;"
                        f"\nwith initialize_config_dir(config_dir='{ROOT}/conf', version_base='1.3'):"
                        f"\n  instantiate(compose('train', overrides={common!r}).data).prepare_data()"],
                       cwd=ROOT, check=True)
        rows = []

        def sweep(name: str, extra: list[str]) -> None:
            out = tmp / f"sweep{len(rows)}"
            tic = time.perf_counter()
            subprocess.run([sys.executable, "train.py", "-m", *common, "seed=0,1", f"hydra.sweep.dir={out}", *extra],
                           cwd=ROOT, check=True, capture_output=True)
            rows.append((name, time.perf_counter() - tic, _train_s(out)))

        sweep("one after the other (basic launcher)", [])
        sweep("joblib, 2 jobs at once, cores shared", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
        out = tmp / "plain"
        tic = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "train.py", *common, f"seed={s}", f"hydra.run.dir={out}/{s}"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for s in (0, 1)]
        assert all(p.wait() == 0 for p in procs)
        rows.append(("2 plain train.py processes at once, every core each", time.perf_counter() - tic, _train_s(out)))

    base = rows[0][1]
    lines = [f"# Two `experiment={a.experiment}` jobs (seeds 0, 1) on {cores} cores", "",
             "`python bench/sweep_parallel.py` (torch " + __import__("torch").__version__ + ")", "",
             "| how | wall for both `s` | each job's training `s` | wall vs one after the other |", "|---|---|---|---|"]
    for name, wall, train in rows:
        lines.append(f"| {name} | {wall:.1f} | {', '.join(f'{t:.1f}' for t in train)} | {wall / base:.2f}x |")
    emit("\n".join(lines), "sweep_parallel", a.out)


if __name__ == "__main__":
    main()
