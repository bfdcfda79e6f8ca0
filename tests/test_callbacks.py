"""Callbacks and dashboards: memory growth names a planted leak, a clean run reports ~0 growth; profiler
tables with real op names; kernel A/B; W&B offline; multirun summary; DDP with two CPU processes."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.memory import MemoryGrowth, MemoryGrowthError, census_diff, tensor_census, theil_sen_slope
from src.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


class Leaky(L.LightningModule):
    """Seed 001's leak: 96 tensors of (8, 3, 256) float32 kept every iteration (2.25 MiB/iter)."""

    def __init__(self, leak: bool = True):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.kept, self.leak = [], leak

    def training_step(self, batch, batch_idx):
        if self.leak:
            self.kept.extend(torch.randn(8, 3, 256) for _ in range(96))
        x, y = batch
        return F.mse_loss(self.lin(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8)


def fit(module, callback, steps):
    L.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module)


def test_memory_planted_leak_is_named_with_shape_and_rate(tmp_path):
    cb = MemoryGrowth(str(tmp_path), window=20, census_gap=5)
    fit(Leaky(), cb, 60)
    top = cb.leak[0]
    assert (top["shape"], top["dtype"], top["device"]) == ((8, 3, 256), "float32", "cpu")
    assert top["count_per_iter"] == 96
    assert top["bytes_per_iter"] == 96 * 8 * 3 * 256 * 4
    report = (tmp_path / "memory_leak.txt").read_text()
    assert "(8, 3, 256) float32" in report and "+96/step" in report
    assert f"made at tests/test_callbacks.py:{_line_of('self.kept.extend(torch.randn(8, 3, 256) for _ in range(96))')}" in report
    assert "in the train loop" in report
    assert cb.summary()["memory/growth_mb_per_step"] == pytest.approx(2.25, rel=0.25)  # heap slope, CPU (seen 2.28)
    rows = list(csv.DictReader((tmp_path / "memory.csv").open()))
    col = "heap_mb" if "heap_mb" in rows[0] else "rss_mb"  # the growth signal (resident memory off glibc)
    assert len(rows) == 60 and float(rows[-1][col]) > float(rows[0][col]) + 100


def test_memory_fail_option_stops_the_run_after_naming_the_leak(tmp_path):
    cb = MemoryGrowth(str(tmp_path), window=20, census_gap=5, fail=True)
    with pytest.raises(MemoryGrowthError, match="MiB/step"):
        fit(Leaky(), cb, 60)
    assert (tmp_path / "memory_leak.txt").is_file() and (tmp_path / "memory.csv").is_file()


def test_memory_no_leak_no_report(tmp_path):
    cb = MemoryGrowth(str(tmp_path), window=20, census_gap=5)
    fit(Leaky(leak=False), cb, 60)
    assert cb.leak is None and not (tmp_path / "memory_leak.txt").exists()
    assert abs(cb.summary()["memory/growth_mb_per_step"]) < 0.1


class ValLeaky(Leaky):
    """Seed 001's leak in validation, with a clean training loop: each validation step keeps 96 tensors of
    (8, 3, 256) float32 (``graph=False``, detached), or its loss with the autograd graph that made it, which
    holds 96 saved tensors of that shape (``graph=True``: the log-det estimated with gradients, kept)."""

    def __init__(self, graph: bool = False):
        super().__init__(leak=False)
        self.graph = graph

    def validation_step(self, batch, batch_idx):
        if not self.graph:
            self.kept.extend(torch.randn(8, 3, 256) for _ in range(96))  # the leaking line (detached)
            return
        with torch.inference_mode(False), torch.enable_grad():
            h = torch.randn(8, 3, 256) + self.lin.weight[0, 0]
            for _ in range(96):
                h = torch.exp(0.01 * h)  # exp saves its (8, 3, 256) result inside the graph, out of Python's sight
            self.kept.append(h.sum())  # the leaking line: a scalar holding its graph

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(160, 4), torch.randn(160, 1)), batch_size=8)


def _line_of(text: str) -> int:
    src = Path(__file__).read_text().splitlines()
    return next(i + 1 for i, line in enumerate(src) if text in line)


@pytest.mark.parametrize("graph", [False, True], ids=["detached", "graph"])
def test_memory_validation_leak_is_named_with_shape_rate_and_line(tmp_path, graph):
    """A leak in ``validation_step`` with a clean training loop: found in the validation loop's own series, named
    by shape, count and MiB per step, with the line that made it; a kept loss is charged the saved tensors of
    its graph (96 x (8, 3, 256) float32 = 2.25 MiB/step) rather than its own 4 bytes."""
    cb = MemoryGrowth(str(tmp_path), window=10, census_gap=5)
    L.Trainer(max_steps=16, val_check_interval=8, limit_val_batches=20, num_sanity_val_steps=0, callbacks=[cb],
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu").fit(ValLeaky(graph))
    summary = cb.summary()
    assert summary["memory/val/leak_found"] is True and summary["memory/train/leak_found"] is False, summary
    assert summary["memory/leak_found"] is True
    assert summary["memory/val/growth_mb_per_step"] > 1.5  # heap slope, CPU (seen 2.32 detached, 2.48 graph-held)
    top = cb.series["val"].leak[0]
    report = (tmp_path / "memory_leak.txt").read_text()
    assert "in the val loop" in report, report
    if graph:
        assert (top["shape"], top["dtype"], top["count_per_iter"]) == ((), "float32", 1)
        held = top["graph"][0]
        assert (held["shape"], held["dtype"], held["count_per_iter"]) == ((8, 3, 256), "float32", 96)
        assert held["bytes_per_iter"] == 96 * 8 * 3 * 256 * 4 and top["graph_bytes_per_iter"] < 1.01 * held["bytes_per_iter"]
        assert "holding a graph of 96 x (8, 3, 256) float32" in report and "= 2.251 MiB/step" in report, report
        # the graph's tensors, visible to Python too (PyTorch keeps their Python objects), are not counted twice
        visible = next(r for r in cb.series["val"].leak if r["shape"] == (8, 3, 256))
        assert visible["held_by_graph_of"] == ((), "float32") and "(the same memory)" in report
        line = _line_of("# the leaking line: a scalar holding its graph")
        assert f"its graph's (8, 3, 256) float32 made at tests/test_callbacks.py:{_line_of('exp saves its')} in validation_step" in report, report
    else:
        assert (top["shape"], top["dtype"], top["count_per_iter"], top["bytes_per_iter"]) == (
            (8, 3, 256), "float32", 96, 96 * 8 * 3 * 256 * 4)
        assert "+96/step" in report and "= 2.250 MiB/step" in report, report
        line = _line_of("# the leaking line (detached)")
    assert "made at tests/test_callbacks.py:" in report and f"tests/test_callbacks.py:{line} in validation_step" in report, report
    rows = list(csv.DictReader((tmp_path / "memory.csv").open()))
    assert {r["loop"] for r in rows} == {"train", "val"} and sum(r["loop"] == "val" for r in rows) == 40


class SparseValLeaky(ValLeaky):
    """The leak of :class:`ValLeaky` (detached, or held by its graph) in a run that validates one batch every 8 training
    steps, as a long training run does: the validation loop gets one step per validation run."""

    def __init__(self, graph: bool = False, leak: bool = True):
        super().__init__(graph)
        self.val_leak = leak

    def validation_step(self, batch, batch_idx):
        if self.val_leak:
            super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("graph", [False, True], ids=["detached", "graph"])
def test_memory_leak_in_a_short_validation_loop_is_found_while_the_run_is_young(tmp_path, graph):
    """With the default settings (``conf/callbacks/memory.yaml``: a 50-step window, census gap 10), a 2.25 MiB/step
    validation leak at one validation batch every 8 training steps is named (shape, MiB/step, line) within 400
    training steps (50 validation steps; the sustained rule alone needs 110 of them, 880 training steps). The same
    run without the leak reports nothing."""
    from src.callbacks.memory.callback import MemoryGrowth as Growth

    def run(leak: bool, out: Path) -> Growth:
        cb = Growth(str(out))
        L.Trainer(max_steps=400, val_check_interval=8, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[cb],
                  logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu").fit(SparseValLeaky(graph, leak))
        return cb

    cb = run(True, tmp_path / "leak")
    assert cb.series["val"].steps == 50 and cb.series["val"].leak is not None, cb.summary()
    assert cb.summary()["memory/train/leak_found"] is False
    report = (tmp_path / "leak" / "memory_leak.txt").read_text()
    assert "in the val loop" in report and "of step pairs above" in report, report
    if graph:
        assert "holding a graph of 96 x (8, 3, 256) float32" in report and "= 2.251 MiB/step" in report, report
        assert f"tests/test_callbacks.py:{_line_of('exp saves its')} in validation_step" in report, report
    else:
        top = cb.series["val"].leak[0]
        assert (top["shape"], top["count_per_iter"]) == ((8, 3, 256), 96) and "= 2.250 MiB/step" in report, report
        assert f"tests/test_callbacks.py:{_line_of('# the leaking line (detached)')} in validation_step" in report

    clean = run(False, tmp_path / "clean")
    assert clean.summary()["memory/leak_found"] is False and not (tmp_path / "clean" / "memory_leak.txt").exists()


def test_memory_helpers():
    assert theil_sen_slope([0, 1, 2, 3, 50, 5, 6]) == pytest.approx(1.0)  # one jump does not move the slope
    keep = [torch.zeros(5, 7, dtype=torch.float16) for _ in range(3)]
    before = tensor_census()
    keep += [torch.zeros(5, 7, dtype=torch.float16) for _ in range(6)]
    rows = census_diff(before, tensor_census(), steps=3)
    assert rows[0]["shape"] == (5, 7) and rows[0]["count_per_iter"] == 2 and rows[0]["bytes_per_iter"] == 2 * 35 * 2
    del keep


def test_memory_census_skips_garbage_awaiting_collection():
    """Tensors held only by an unreachable cycle (a finished run's module, say) are not live: a census must not
    count them, or their collection between two censuses hides a real leak of the same shape."""
    import gc

    gc.disable()  # keep the cycle uncollected until the census itself collects
    try:
        cycle: list = [torch.zeros(3, 11, 5) for _ in range(10)]
        cycle.append(cycle)
        del cycle
        assert tensor_census()[((3, 11, 5), "float32", "cpu")] == 0
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def callbacks_all_run(tmp_path_factory, data_dir):
    """``experiment=dvgo_smoke callbacks=all`` (the README's command), once for the tests below."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    out = tmp_path_factory.mktemp("all")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", f"paths.data_dir={data_dir}",
                                          "trainer.enable_progress_bar=false", "experiment=dvgo_smoke",
                                          "callbacks=all", "trainer.val_check_interval=150"])
    return out, run(cfg)


@pytest.mark.slow
def test_callbacks_all_writes_every_artifact(callbacks_all_run):
    out, metrics = callbacks_all_run
    for name in ("profile/train_table.txt", "profile/train_trace.json", "profile/val_table.txt", "memory.csv",
                 "kernel_ab.txt", "metrics.json"):
        assert (out / name).is_file(), name
    table = (out / "profile" / "train_table.txt").read_text()
    assert "aten::grid_sampler_3d" in table and "# of Calls" in table  # real op names, DVGO's hottest op
    assert json.loads((out / "profile" / "train_trace.json").read_text())["traceEvents"]
    assert metrics["throughput/it_s"] > 0 and metrics["throughput/rays_s"] == pytest.approx(
        metrics["throughput/it_s"] * 1024, rel=1e-3)
    assert metrics["throughput/coarse_it_s"] > 0 and metrics["throughput/fine_it_s"] > 0


@pytest.mark.slow
def test_phase_tables_cover_dvgo_steps(callbacks_all_run):
    """The profiler's phase table (above the op table) names DVGO's phases, which sum to within 10% of the step,
    in training and validation; the phases cost nothing when the profiler is off (they are bare contexts)."""
    from src.phases import phase
    from tests.conftest import assert_instruments

    out, metrics = callbacks_all_run
    assert_instruments(out, metrics, {"train": {"sample", "density", "composite", "colour", "loss", "backward",
                                                "optimizer"}, "val": {"sample", "density", "composite", "colour",
                                                                      "metrics"}})
    assert phase("x") is phase("y")  # off: one shared nullcontext, nothing recorded


@pytest.mark.slow
def test_memory_clean_dvgo_smoke_reports_growth_near_zero(callbacks_all_run):
    out, metrics = callbacks_all_run
    assert metrics["memory/leak_found"] is False
    assert abs(metrics["memory/growth_mb_per_step"]) < 0.3, metrics  # the planted leak reads 2.25
    assert not (out / "memory_leak.txt").exists()
    rows = list(csv.DictReader((out / "memory.csv").open()))
    assert sum(r["loop"] == "train" for r in rows) == metrics["train/steps"]
    assert metrics["memory/val/leak_found"] is False and metrics["memory/test/leak_found"] is False


@pytest.mark.slow
def test_kernel_ab_compares_the_triton_kernels_with_the_reference(callbacks_all_run):
    """Under TRITON_INTERPRET (conftest) the fast backend is checked on CPU: errors tiny, every op listed."""
    out, metrics = callbacks_all_run
    text = (out / "kernel_ab.txt").read_text()
    for op in ("sample_pts_on_rays", "raw2alpha", "alpha_to_weights", "segment_sum", "grid_adam_step"):
        assert f"| {op} | triton |" in text, text
    assert metrics["kernel_ab/max_abs_err"] < 1e-4


@pytest.mark.slow
def test_wandb_offline_run_holds_the_results(make_cfg, tmp_path, monkeypatch, capfd):
    """The offline run's record log (what `wandb sync` uploads) holds the composed config once (no flattened
    model hyperparameters beside it), every metrics.json key in the summary, the test views as a table with their
    images and scores, the mesh as a 3D object, and the val panel; and W&B prints no deprecation notice."""
    from tests.wandb_records import read_run, records

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "run"
    metrics = run(make_cfg("experiment=dvgo_smoke", "logger=wandb", "model.coarse.iters=20",
                           "model.coarse.alpha_init=0.01", "model.fine.iters=10", "model.fine.pg_scale=[5]",
                           "trainer.val_check_interval=30", "model.mesh_resolution=24", out=out))
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list((run_dir / "files" / "media" / "images").rglob("*.png")), "val panel image"
    record_file = next(run_dir.glob("*.wandb"))
    rec = read_run(record_file)
    assert set(rec["config"]) == {"callbacks", "ckpt_path", "data", "float32_matmul_precision", "kernels", "logger",
                                  "model", "optimized_metric", "paths", "resume", "seed", "task_name", "trainer"}
    assert rec["config"]["model"]["n_rand"] == 1024
    saved = json.loads((out / "metrics.json").read_text())
    for key, value in saved.items():
        assert key in rec["summary"], key
        if isinstance(value, float) and value == value:
            assert rec["summary"][key] == pytest.approx(value), key
    table = rec["summary"]["test/items"]
    assert table["_type"] == "table-file" and table["nrows"] == 3 and table["ncols"] == 6
    columns = json.loads(next((run_dir / "files").rglob("items_*.table.json")).read_text())["columns"]
    assert columns == ["view", "rgb", "depth", "test/psnr", "test/ssim", "test/render_s_per_img"]
    (artifact,) = [r.artifact for r in records(record_file) if r.WhichOneof("record_type") == "artifact"
                   and r.artifact.type == "run_table"]
    images = sorted(Path(c.path).name for c in artifact.manifest.contents if c.path.endswith(".png"))
    assert images == sorted(f"{i:03d}_{k}.png" for i in range(3) for k in ("rgb", "depth"))
    assert rec["summary"]["test/mesh"]["_type"] == "object3D-file"
    assert metrics["test/psnr"] == pytest.approx(rec["summary"]["test/psnr"])
    assert "anonymous" not in capfd.readouterr().err


@pytest.mark.slow
def test_multirun_writes_the_sweep_summary(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "train.py", "-m", "experiment=dvgo_smoke", f"paths.data_dir={data_dir}",
                           "model.coarse.iters=20", "model.coarse.alpha_init=0.01", "model.fine.iters=10",
                           "model.fine.pg_scale=[5]", "model.fine.num_voxels=32768,64000", f"hydra.sweep.dir={sweep}",
                           "trainer.enable_progress_bar=false"], cwd=ROOT, check=True, capture_output=True, text=True)
    summary = (sweep / "summary.md").read_text()
    assert "| job | model.fine.num_voxels | test/psnr (optimised) | test/ssim | test/lpips | train" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert [r.split(" | ")[1] for r in rows] == ["32768", "64000"]
    assert all("failed" not in r for r in rows)
    psnr = {n: json.loads((sweep / n / "metrics.json").read_text())["test/psnr"] for n in ("0", "1")}
    best = max(psnr, key=psnr.get)
    line = f"job {best} (model.fine.num_voxels={['32768', '64000'][int(best)]}): test/psnr = {psnr[best]:.6g}"
    assert line in summary and line in proc.stdout + proc.stderr  # written and printed when the multirun ends


def test_sweep_summary_uses_the_methods_metrics_and_direction(tmp_path):
    """A PU-INN sweep's table shows CD / HD / P2F (not PSNR), and the best job is the lowest CD."""
    import yaml

    from src.callbacks.sweep import summarize

    for num, (k, cd) in enumerate([(2, 0.9), (4, 0.7), (8, 0.8)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.net.k={k}", "experiment=pu_inn_smoke"]))
        (job / "config.yaml").write_text(yaml.safe_dump({"model": {"_target_": "src.models.pu_inn.module.PUINNModule"},
                                                         "optimized_metric": None}))
        (job / "metrics.json").write_text(json.dumps({"test/cd": cd, "test/hd": 10 * cd, "test/p2f": cd / 2,
                                                      "time/train_s": 61.0, "memory/peak_mb": 800.0}))
    (tmp_path / "3").mkdir()  # a job that failed
    table, best = summarize(tmp_path)
    assert table.splitlines()[0] == ("| job | model.net.k | test/cd (optimised) | test/hd | test/p2f | train `mm:ss` "
                                     "| peak MB | it/s |")
    assert "| 1 | 4 | 0.7 | 7.00 | 0.35 | 01:01 | 800.00 |" in table
    assert "| 3 |  | failed (no metrics.json) |" in table
    assert best.endswith("job 1 (model.net.k=4): test/cd = 0.7") and "lower is better" in best


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_writes_one_metrics_json(tmp_path, data_dir):
    out = tmp_path / "ddp"
    # 3 val views (their own scene folder): the last step validates them, 2 on one rank and 1 on the other
    proc = subprocess.run([sys.executable, "train.py", "experiment=dvgo_smoke", "trainer=ddp_cpu",
                           f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", "trainer.enable_progress_bar=false",
                           "model.coarse.iters=100", "model.coarse.alpha_init=0.01", "model.fine.iters=40",
                           "model.fine.pg_scale=[20]", "data.generate.n_val=3", f"data.root={data_dir}/ddp_val3",
                           "trainer.val_check_interval=140"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.rglob("metrics.json"))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train/steps"] == 140 and metrics["test/psnr"] > 12
    assert "parameters identical across 2 ranks" in (out / "train.log").read_text()
    # the 3 test views split over 2 ranks (the sampler pads them to 4): the scores are over the 3 unique views,
    # equal to testing the same checkpoint in one process
    from tests.conftest import evaluate_run

    one = evaluate_run(out, tmp_path / "one", "trainer=cpu")
    assert [r["view"] for r in json.loads((out / "test_scores.json").read_text())] == [0, 1, 2]
    assert abs(metrics["test/psnr"] - one["test/psnr"]) < 1e-4, (metrics["test/psnr"], one["test/psnr"])
    assert metrics["test/ssim"] == pytest.approx(one["test/ssim"], abs=1e-6)
    # validation too: val/psnr over the 3 unique val views (not the sampler's padded 4), as one process scores them
    one_val = evaluate_run(out, tmp_path / "one_val", "trainer=cpu", "data.test_split=val")
    assert abs(metrics["val/psnr"] - one_val["test/psnr"]) < 1e-4, (metrics["val/psnr"], one_val["test/psnr"])
    assert metrics["val/ssim"] == pytest.approx(one_val["test/ssim"], abs=1e-6)


def test_joblib_sweep_jobs_get_their_share_of_the_cores(monkeypatch):
    """In a ``hydra/launcher=joblib`` multirun each job takes cores // n_jobs torch threads (two jobs that each
    take every core of a 2-core machine run 3.4x slower than one after the other: bench/sweep_parallel.py)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from src.process import share_cores_in_parallel_sweeps

    before = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    hc = HydraConfig.instance()
    saved = hc.cfg
    try:
        for n_jobs, want in ((2, 4), (3, 2), (-1, 1), (16, 1)):
            hc.cfg = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "launcher": {
                "_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": n_jobs}}})
            assert share_cores_in_parallel_sweeps() == want and torch.get_num_threads() == want, n_jobs
        hc.cfg = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "launcher": {
            "_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}}})
        assert share_cores_in_parallel_sweeps() is None  # one job at a time: every core
    finally:
        hc.cfg = saved
        torch.set_num_threads(before)
