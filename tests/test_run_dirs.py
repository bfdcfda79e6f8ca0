"""Where a run goes and how it goes on, without training: the stop flag, the run dir a resumed or requeued run
continues in (and Hydra's record of it), the CSV log and W&B run it continues, and the clear errors for a run dir
that cannot be written or a ``resume=`` that has nothing to resume."""
from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src import stop
from src.run_config import latest_checkpoint, resume_dir, resumed_config
from tests.conftest import CONF_DIR


def _run_dir(root: Path, steps: dict[str, int] | None = None) -> Path:
    """A run dir as train.py leaves it: its saved config, and checkpoints at the given global steps."""
    (root / ".hydra").mkdir(parents=True)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        saved = compose("train", overrides=["experiment=dvgo_smoke", "trainer.max_steps=123"])
    OmegaConf.save(saved, root / ".hydra" / "config.yaml")
    for name, step in (steps or {}).items():
        (root / "checkpoints").mkdir(exist_ok=True)
        torch.save({"global_step": step, "state_dict": {}}, root / "checkpoints" / name)
    return root


def test_the_stop_flag_is_set_by_a_signal_checked_by_loops_and_cleared_after_the_run():
    before = signal.getsignal(signal.SIGTERM)
    with stop.handling_signals():
        stop.check("a loop")  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(stop.Stopped, match="stopped by SIGTERM during a loop") as caught:
            stop.check("a loop")
        assert caught.value.exit_code == 143
        assert not isinstance(caught.value, Exception)  # `except Exception` in a loader cannot swallow it
    assert signal.getsignal(signal.SIGTERM) is before
    with stop.handling_signals():
        assert stop.requested() is None  # the next run in this process starts clear


def test_latest_checkpoint_is_the_one_with_most_steps_and_skips_unreadable_files(tmp_path):
    run = _run_dir(tmp_path / "run", {"step000100.ckpt": 100, "last.ckpt": 160, "final.ckpt": 160})
    assert latest_checkpoint(run).name == "last.ckpt"
    (run / "checkpoints" / "step000200.ckpt").write_bytes(b"cut short by a kill")
    assert latest_checkpoint(run).name == "last.ckpt"
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_which_run_dir_a_run_continues_in(tmp_path, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    runs = tmp_path / "train" / "runs"
    run = _run_dir(runs / "2026-01-01_00-00-00", {"last.ckpt": 50})
    assert resume_dir(str(run), None, runs) == run.resolve()
    assert resume_dir(None, str(run / "checkpoints" / "last.ckpt"), runs) == run.resolve()
    loose = tmp_path / "elsewhere.ckpt"
    torch.save({"global_step": 1, "state_dict": {}}, loose)
    assert resume_dir(None, str(loose), runs) is None  # a checkpoint outside a run dir starts a new run
    assert resume_dir(None, None, runs) is None

    mine = _run_dir(runs / "2026-01-02_00-00-00_slurm77", {"last.ckpt": 20})
    _run_dir(runs / "2026-01-03_00-00-00_slurm78", {"last.ckpt": 30})
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert resume_dir(None, None, runs) is None  # a job's first start: a new run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_dir(None, None, runs) == mine.resolve()  # requeued: its own run dir, by the job id
    assert resume_dir(None, None, runs, current=run) == run.resolve()  # a sweep job's fixed folder comes first


def test_hydra_puts_a_resumed_run_in_its_own_dir_and_keeps_its_saved_config(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run = _run_dir(tmp_path / "runs" / "2026-01-01_00-00-00", {"last.ckpt": 50})

    def hydra_dirs(*overrides: str) -> tuple[str, str]:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.log_dir={tmp_path}", *overrides], return_hydra_config=True)
        return str(cfg.hydra.run.dir), str(cfg.hydra.output_subdir)

    run_dir, subdir = hydra_dirs(f"resume={run}")
    assert run_dir == str(run.resolve()) and subdir.startswith(".hydra/resumed_")
    assert hydra_dirs(f"ckpt_path={run}/checkpoints/last.ckpt")[0] == str(run.resolve())
    new_dir, subdir = hydra_dirs()
    assert Path(new_dir).parent == tmp_path / "train" / "runs" and subdir == ".hydra"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert hydra_dirs()[0].endswith("_slurm4242")  # so the requeued job finds it


def test_resume_takes_the_saved_config_with_this_command_lines_overrides(tmp_path):
    run = _run_dir(tmp_path / "run", {"step000100.ckpt": 100, "last.ckpt": 160})
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"resume={run}", "trainer.log_every_n_steps=7"])
    resumed = resumed_config(cfg, [f"resume={run}", "trainer.log_every_n_steps=7"], tmp_path / "run")
    assert resumed.model.coarse.iters == 150 and resumed.trainer.max_steps == 123  # the run's own config
    assert resumed.trainer.log_every_n_steps == 7  # the override on the resume command
    assert resumed.paths.output_dir == str(run.resolve()) and resumed.ckpt_path == str(run.resolve() / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="experiment=nerf_smoke: a conf/experiment preset sets keys across the whole"):
        resumed_config(cfg, [f"resume={run}", "experiment=nerf_smoke"], tmp_path / "run")


@pytest.mark.parametrize("case", ["missing", "not a run dir", "no checkpoint"])
def test_resume_of_a_dir_with_nothing_to_resume_says_so(tmp_path, case):
    target = tmp_path / "run"
    if case == "not a run dir":
        target.mkdir()
    elif case == "no checkpoint":
        _run_dir(target)  # stopped before its first step
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"resume={target}"])
    expect = {"missing": "no such run dir", "not a run dir": "not a run dir of train.py",
              "no checkpoint": "checkpoints holds no checkpoint to resume from"}[case]
    with pytest.raises(FileNotFoundError, match=rf"resume={target}: .*{expect}"):
        resumed_config(cfg, [f"resume={target}"], tmp_path / "new")


def test_an_output_dir_that_cannot_be_written_stops_before_anything_is_read(make_cfg, tmp_path):
    from src.pipeline import run

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    with pytest.raises(PermissionError, match=rf"paths.output_dir={out}: the run dir cannot be written"):
        run(make_cfg("experiment=dvgo_smoke", f"data.root={tmp_path / 'scene'}", out=out))
    assert not (tmp_path / "scene").exists()  # nothing generated, nothing trained


def test_a_resumed_csv_log_keeps_the_earlier_steps_and_drops_those_it_will_log_again(tmp_path):
    from lightning.pytorch.loggers import CSVLogger as LightningCSV

    from src.loggers import CSVLogger

    def first_run():
        logger = CSVLogger(str(tmp_path), name="csv", version="")
        for step in range(10):
            logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        logger.save()
        return tmp_path / "csv" / "metrics.csv"

    def steps(path: Path) -> list[int]:
        with path.open() as f:
            return [int(r["step"]) for r in csv.DictReader(f)]

    path = first_run()
    resumed = CSVLogger(str(tmp_path), name="csv", version="")
    resumed.continue_from(6)  # the checkpoint was written after step 5; steps 6-9 are trained again
    for step in range(6, 12):
        resumed.log_metrics({"train/loss": 0.1, "val/psnr": 20.0} if step == 11 else {"train/loss": 0.1}, step=step)
    resumed.save()
    assert steps(path) == list(range(12))
    with path.open() as f:
        assert "val/psnr" in next(csv.reader(f))  # a key new in the resumed part widens the header
    first_run()
    plain = LightningCSV(str(tmp_path), name="csv", version="")  # why the subclass: Lightning's deletes the log
    plain.log_metrics({"train/loss": 0.1}, step=6)
    plain.save()
    assert steps(path) == [6]


def test_the_w_and_b_run_id_of_a_run_dir_is_its_newest_record(tmp_path):
    from src.loggers import wandb_run_id

    assert wandb_run_id(tmp_path) is None
    (tmp_path / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)
    (tmp_path / "wandb" / "run-20260102_000000-xyz789").mkdir()
    (tmp_path / "wandb" / "latest-run").mkdir()
    assert wandb_run_id(tmp_path) == "xyz789"


def test_the_slurm_launcher_preset_composes_with_its_requeue_settings():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.signal_delay_s == 120 and launcher.timeout_min == 240 and launcher.max_num_timeout == 20
    assert signal.SIGUSR2 in stop.REQUEUE_SIGNALS  # submitit's signal is one the runs act on


def test_a_mistyped_resume_dir_is_not_created(tmp_path):
    """``resume=`` a folder that is not a run: Hydra is given a new run dir (where the error is logged), not the
    mistyped path."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.log_dir={tmp_path}", f"resume={tmp_path / 'typo'}"],
                      return_hydra_config=True)
    assert Path(str(cfg.hydra.run.dir)).parent == tmp_path / "train" / "runs" and cfg.hydra.output_subdir == ".hydra"
