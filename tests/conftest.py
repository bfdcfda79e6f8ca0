"""Shared fixtures: composed configs (the real conf/ tree, shrunk to CPU) and generated scenes."""
from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton kernels are checked on CPU tensors by its interpreter; this must
    os.environ.setdefault("TRITON_INTERPRET", "1")  # be set before triton is first imported

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import src.config  # noqa: F401  (resolvers)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LEGO = SHARED_DATA / "nerf_synthetic" / "lego"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Where generated scenes go for the whole session (generated once, reused by every test)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(data_dir, tmp_path):
    """Compose ``conf/train.yaml`` with overrides, writing into this test's tmp dir."""

    def _make(*overrides: str, out: Path | None = None) -> DictConfig:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=[
                f"paths.output_dir={out or tmp_path / 'run'}", f"paths.data_dir={data_dir}",
                "trainer.enable_progress_bar=false", *overrides])

    return _make


DVGO_SMOKE = ("experiment=dvgo_smoke",)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir):
    """One complete DVGO smoke run (in this process), shared by the tests that compare against it: (run dir,
    metrics)."""
    from src.pipeline import run

    out = tmp_path_factory.mktemp("smoke")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", f"paths.data_dir={data_dir}",
                                          "trainer.enable_progress_bar=false", *DVGO_SMOKE])
    return out, run(cfg)


def needs_lego():
    return pytest.mark.skipif(not (LEGO / "transforms_train.json").is_file(),
                              reason=f"real lego not found at {LEGO}")


def evaluate_run(run_dir: Path, out: Path, *overrides: str, render: str = "test", ckpt: str = "final.ckpt") -> dict:
    """What ``python eval.py ckpt_path=<run_dir>/checkpoints/<ckpt> render=<render> <overrides>`` does, in this
    process (into ``out``)."""
    from src.run_config import apply_overrides, load_run_config, repoint
    from src.pipeline import evaluate

    path = run_dir / "checkpoints" / ckpt
    cfg, _ = load_run_config(path)
    cfg = repoint(apply_overrides(cfg, list(overrides)), str(out))
    return evaluate(cfg, str(path), render)


def assert_same_test_metrics(trained: dict, evaluated: dict) -> None:
    """Every test score of the training run (not timings) equals the evaluation's."""
    keys = [k for k, v in trained.items() if k.startswith("test/") and isinstance(v, float) and "_s" not in k]
    assert keys
    for k in keys:
        assert evaluated[k] == pytest.approx(trained[k], rel=1e-6, abs=1e-9), k


def assert_instruments(out: Path, metrics: dict, phases: dict[str, set[str]]) -> None:
    """What ``callbacks=all`` gives a smoke run: no memory growth found in any loop (no false alarm),
    and for each loop in ``phases`` a phase table, above the op table, holding at least those phases, whose
    phases sum to within 10% of the step time."""
    import json

    assert metrics["memory/leak_found"] is False and not (out / "memory_leak.txt").exists(), metrics
    for loop in ("train", "val", "test"):
        if f"memory/{loop}/leak_found" in metrics:
            assert metrics[f"memory/{loop}/leak_found"] is False, loop
    for loop, names in phases.items():
        table = json.loads((out / "profile" / f"{loop}_phases.json").read_text())
        seen = {r["phase"] for r in table["rows"]}
        assert names <= seen, (loop, sorted(names - seen), sorted(seen))
        assert table["steps"] >= 1 and table["marked_ms"] >= 0.9 * table["step_ms"], (loop, table)
        assert (out / "profile" / f"{loop}_table.txt").read_text().startswith(f"# {loop}: phases"), loop
