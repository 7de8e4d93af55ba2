"""ResumeCheckpoint: a ``last.ckpt`` written only after training steps, so that a fit resumes exactly where it was."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from typing_extensions import override

DEFAULT_EVERY_N_TRAIN_STEPS = 200


class ResumeCheckpoint(ModelCheckpoint):
    r"""Keep ``last.ckpt`` as the point to resume a fit from (``ckpt_path="last"``, ``--ckpt_path last``).

    It is written after a training step, never at an epoch's end nor after a validation: every
    ``every_n_train_steps`` optimizer steps, at the step where ``max_steps`` stops the fit, and after the last batch
    of the last epoch. Such a checkpoint holds a position inside an epoch, which the DataModules' resumable training
    loaders (and :class:`~lightning_revrnn.lm.LanguageModel`'s carried state) continue from, so the resumed fit runs
    exactly the steps, validations and learning-rate updates an uninterrupted one would (bit for bit with the same
    number of processes and threads). A fit killed between two saves repeats at most ``every_n_train_steps`` steps.

    What a ``ModelCheckpoint(save_last=True)`` gets wrong here, and this callback avoids:

    - a fit stopped by ``max_steps`` in the middle of an epoch is saved at the train-epoch end that the stop
      triggers, marked as a finished epoch: resumed, it skips the rest of the epoch;
    - a checkpoint saved after an epoch's validation resumes in the next epoch without that validation's
      learning-rate plateau update (the models' ``ReduceLROnPlateau``; Lightning does not redo it).

    Args:
        dirpath: the folder of ``last.ckpt``. Give every run of a config the same folder, so that ``ckpt_path="last"``
            finds it (the default, the logger's version folder, is a new one for each run).
        every_n_train_steps: save after every this many optimizer steps.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = DEFAULT_EVERY_N_TRAIN_STEPS) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be at least 1, got {every_n_train_steps}.")
        # one file, overwritten (no last-v1.ckpt beside an older run's last.ckpt)
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._should_skip_saving_checkpoint(trainer):  # also: already saved at this step (accumulation)
            return
        if trainer.global_step % self._every_n_train_steps == 0 or _fit_ends_after_this_batch(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the fit loop would be saved as a finished epoch, also when ``max_steps`` stopped it midway."""

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: resumed from there, Lightning would skip the epoch's learning-rate plateau update."""


def _fit_ends_after_this_batch(trainer: pl.Trainer) -> bool:
    """``max_steps`` is reached, or this is the last batch of the last epoch."""
    if trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    return last_epoch and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
