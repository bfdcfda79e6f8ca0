"""The training side of :mod:`src.stop`: every run's trainer has this callback (it is not a ``conf/callbacks``
choice). It checks the stop flag at each batch of every loop; in training it writes ``checkpoints/last.ckpt`` where
the step ends (the state a ``ModelCheckpoint`` would save there, so a resumed run continues exactly) and stops.
Under DDP the ranks agree on the training step to stop at (any rank's signal counts), so none is left waiting in a
collective."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src import stop

log = logging.getLogger(__name__)


class StopOnSignal(L.Callback):
    def __init__(self, ckpt_dir: str | Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.saved_step: int | None = None  # the global step last.ckpt was written at by this callback
        self.requeue_note = ""

    @property
    def last_ckpt(self) -> Path:
        return self.ckpt_dir / "last.ckpt"

    @staticmethod
    def _requested(trainer: L.Trainer) -> bool:
        """Training: any rank's flag, agreed across ranks (one small all-reduce per step under DDP)."""
        flag = stop.requested() is not None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        return flag

    @staticmethod
    def _requested_here(trainer: L.Trainer) -> bool:
        """This process's flag, in one process only: under DDP the ranks agree on a stop where a training step ends
        (they run different numbers of evaluation batches, src/data/loaders.py, so nothing else may be collective)."""
        return trainer.world_size == 1 and stop.requested() is not None

    def _raise(self, trainer: L.Trainer, where: str) -> None:
        raise stop.Stopped(stop.requested() or 15, where)  # another rank's signal under DDP: SIGTERM's code

    def save(self, trainer: L.Trainer) -> None:
        """``last.ckpt`` at this step (atomically, by the run's checkpoint plugin); requeue the SLURM job if asked."""
        if trainer.global_step == 0 or self.saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.last_ckpt, weights_only=False)
        self.saved_step = trainer.global_step
        if stop.requeue_requested() and trainer.is_global_zero:
            self.requeue_note = stop.requeue_job()
            log.warning(self.requeue_note)

    # ---- training: stop where a step ends -------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # a signal during setup or evaluation; under DDP the ranks agree on it at this step's end (one collective)
        if self._requested_here(trainer):
            self.save(trainer)
            self._raise(trainer, f"training (before step {trainer.global_step})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._requested(trainer):
            self.save(trainer)
            self._raise(trainer, f"training (step {trainer.global_step})")

    # ---- evaluation loops: stop between batches --------------------------------------------------
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._requested_here(trainer):
            self.save(trainer)  # Lightning resumes a checkpoint written mid-validation by finishing the validation
            self._raise(trainer, f"validation (batch {batch_idx}, after step {trainer.global_step})")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._requested_here(trainer):
            self._raise(trainer, f"testing (batch {batch_idx})")

    def on_exception(self, trainer, pl_module, exception) -> None:
        """A stop noticed elsewhere (a long loop's :func:`src.stop.check`, or Lightning's own SIGTERM check between
        steps): write ``last.ckpt`` as well if training had taken a step."""
        if isinstance(exception, (stop.Stopped, SIGTERMException)) and trainer.state.fn == "fit":
            self.save(trainer)
