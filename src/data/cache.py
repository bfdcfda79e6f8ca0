"""Files made once and shared, and files that must never be half-written: generated scenes and patch caches that
several jobs of a sweep, DDP ranks or runs on a shared machine may ask for at the same moment, and checkpoints.
Shared ones are made under an exclusive file lock (the first job makes them, the others wait and then read them);
all are written to a per-process temporary twin and renamed into place, so nobody ever reads a half-written file
and an interrupted job leaves nothing behind."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.data.errors import DataError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path, what: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` (created if missing) for the block; a job that has
    to wait says so once. The lock goes with the process, so a killed holder never leaves it stuck."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s (lock %s)", what or path.stem, path)
            tic = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("%s is ready after %.1f s", what or path.stem, time.perf_counter() - tic)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def temporary_twin(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process uses (its pid), for writing before the rename."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary twin of ``path`` to write; when the block ends normally it replaces ``path`` (which is then
    either the old file or the whole new one, never a partial write), else it is removed."""
    tmp = temporary_twin(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomic(obj: object, path: Path) -> Path:
    """``torch.save`` through :func:`replaced_atomically`."""
    with replaced_atomically(path) as tmp:
        torch.save(obj, tmp)
    return path


def write_once(root: Path, params: dict, fill: Callable[[Path], None]) -> Path:
    """Write a generated dataset to ``root`` unless an identical one (same ``scene.json``) is there. Under a lock
    beside ``root``: the first process runs ``fill`` into its own temporary folder and renames it into place; the
    others wait for it and find the scene done."""
    root = Path(root)
    stamp = root / "scene.json"

    def done() -> bool:
        return stamp.exists() and json.loads(stamp.read_text()) == params

    if done():
        return root
    with file_lock(root.with_name(f".{root.name}.lock"), f"the generated scene {root}"):
        if done():  # made by the process that held the lock
            return root
        if root.exists() and not stamp.exists() and any(root.iterdir()):
            raise DataError(f"refusing to generate a scene into {root}: it holds files that were not generated here "
                            "(no scene.json). Is data.generate set on a real dataset? Set data.generate=null")
        tmp = temporary_twin(root)
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("generating the procedural scene into %s (%s)", root, params)
        try:
            fill(tmp)
            (tmp / "scene.json").write_text(json.dumps(params))
            shutil.rmtree(root, ignore_errors=True)  # an older version of the scene (other parameters)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each checkpoint to a temporary twin and renaming it into place: a
    process killed while writing ``last.ckpt`` leaves the previous ``last.ckpt`` whole (Lightning writes the file
    in place)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: object | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
