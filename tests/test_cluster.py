"""Runs that survive a cluster, each a real ``python train.py`` process sent a real signal: SIGTERM during DVGO's
per-voxel view count and mid-training (exit within 30 s, the resume command printed, ``last.ckpt`` when a step was
taken), ``resume=RUN`` continuing in place (one CSV, one W&B run, a continued memory series, the uninterrupted run's
test scores), and SLURM's requeue signal (checkpoint, ``scontrol requeue`` through a stand-in on PATH, the requeued
job resuming in its own run dir)."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=dvgo_smoke", "trainer.enable_progress_bar=false"]
EXIT_WITHIN_S = 30.0


class Train:
    """``python train.py <args>`` in the background, its output collected line by line."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, ready, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the run ended before the signal was due:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting:\n{self.output[-3000:]}"
            time.sleep(0.05)

    def signal_and_wait(self, signum: int) -> float:
        """Send ``signum``; the seconds until the process ended (it must end within :data:`EXIT_WITHIN_S`)."""
        tic = time.monotonic()
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"still running {EXIT_WITHIN_S} s after {signal.Signals(signum).name}:\n{self.output[-3000:]}")
        self._reader.join(timeout=10)
        return time.monotonic() - tic

    def finish(self, timeout: float = 600.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc


def _run_dirs(log_dir: Path) -> list[Path]:
    return sorted(p for p in (log_dir / "train" / "runs").iterdir() if p.is_dir())


def _step_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def _csv_steps(run_dir: Path) -> list[int]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _assert_same_result(metrics: dict, full: dict) -> None:
    assert metrics["train/steps"] == full["train/steps"] == 300
    assert metrics["test/psnr"] == pytest.approx(full["test/psnr"], abs=1e-3)  # as the in-process resume test
    assert metrics["test/ssim"] == pytest.approx(full["test/ssim"], abs=1e-4)


def test_sigterm_during_the_per_voxel_count_ends_the_run_at_once_without_a_checkpoint(data_dir, tmp_path):
    run = Train([*SMOKE, f"paths.log_dir={tmp_path}", f"paths.data_dir={data_dir}"])
    run.wait_for(lambda: "counting the training views" in run.output)
    seconds = run.signal_and_wait(signal.SIGTERM)
    assert run.proc.returncode == 128 + signal.SIGTERM, run.output[-3000:]
    assert seconds < EXIT_WITHIN_S
    assert "Stopped by SIGTERM during DVGO's per-voxel view count (view" in run.output, run.output[-3000:]
    assert "no checkpoint was written, nothing to resume" in run.output
    assert not list(tmp_path.rglob("*.ckpt"))


def test_sigterm_mid_training_then_resume_in_place_ends_as_an_uninterrupted_run(smoke_run, data_dir, tmp_path):
    """Stopped mid-training, continued with the printed ``python train.py resume=RUN``: the same test scores as the
    uninterrupted smoke run, in the one run dir, with one CSV log (the same steps as the uninterrupted run's), one
    W&B run (offline record: every segment under the same id), and the memory series continued step by step."""
    full_dir, full = smoke_run
    args = [*SMOKE, f"paths.log_dir={tmp_path}", f"paths.data_dir={data_dir}", "callbacks=memory", "logger=wandb",
            "logger.wandb.mode=offline", "callbacks.model_checkpoint.every_n_train_steps=50"]
    run = Train(args, env={"WANDB_SILENT": "true"})
    run.wait_for(lambda: any(tmp_path.glob("train/runs/*/checkpoints/step000050.ckpt")))
    seconds = run.signal_and_wait(signal.SIGTERM)
    assert run.proc.returncode == 128 + signal.SIGTERM, run.output[-3000:]
    assert seconds < EXIT_WITHIN_S
    [run_dir] = _run_dirs(tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    stopped_at = _step_of(last)
    assert 50 <= stopped_at < 300, stopped_at  # written where the run stopped, mid-training
    resume = f"python train.py resume={run_dir}"
    # where a step ends, or (a signal between two steps) before the next one: either way at the checkpoint's step
    assert re.search(rf"Stopped by SIGTERM during training \((before )?step {stopped_at}\)", run.output), run.output[-2000:]
    assert resume in run.output

    again = Train(resume.split()[2:], env={"WANDB_SILENT": "true"})
    assert again.finish() == 0, again.output[-3000:]
    assert _run_dirs(tmp_path) == [run_dir]  # continued in place, no second run dir
    _assert_same_result(json.loads((run_dir / "metrics.json").read_text()), full)
    assert _csv_steps(run_dir) == _csv_steps(full_dir)  # one log, no step twice, none missing
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and len({p.name.rsplit("-", 1)[1] for p in segments}) == 1, segments  # one W&B run
    with (run_dir / "memory.csv").open() as f:
        train_steps = [int(r["step"]) for r in csv.DictReader(f) if r["loop"] == "train"]
    assert train_steps == list(range(1, 301))  # the series continued across the resume
    assert (run_dir / ".hydra" / "config.yaml").is_file() and list((run_dir / ".hydra").glob("resumed_*/overrides.yaml"))


def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_resumes(smoke_run, data_dir, tmp_path):
    """Under SLURM (its variables set, a stand-in ``scontrol`` on PATH that records its arguments) the requeue
    signal (``sbatch --signal=USR1@90``) writes ``last.ckpt``, runs ``scontrol requeue <job id>`` and ends the job;
    the same command started again as the requeued job (``SLURM_RESTART_COUNT=1``) finds its run dir by the job id
    and finishes there with the uninterrupted run's scores."""
    _, full = smoke_run
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
             "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}
    args = [*SMOKE, f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={data_dir}",
            "callbacks.model_checkpoint.every_n_train_steps=50"]
    job = Train(args, env=slurm)
    job.wait_for(lambda: any(tmp_path.glob("logs/train/runs/*/checkpoints/step000050.ckpt")))
    seconds = job.signal_and_wait(signal.SIGUSR1)
    assert seconds < EXIT_WITHIN_S and job.proc.returncode != 0, job.output[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in job.output
    [run_dir] = _run_dirs(tmp_path / "logs")
    assert run_dir.name.endswith("_slurm4242")
    stopped_at = _step_of(run_dir / "checkpoints" / "last.ckpt")
    assert 50 <= stopped_at < 300

    requeued = Train(args, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert requeued.finish() == 0, requeued.output[-3000:]
    assert _run_dirs(tmp_path / "logs") == [run_dir]
    assert f"continuing {run_dir}" in requeued.output
    _assert_same_result(json.loads((run_dir / "metrics.json").read_text()), full)
