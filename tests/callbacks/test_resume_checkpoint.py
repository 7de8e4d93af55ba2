"""ResumeCheckpoint: when last.ckpt is written (the resume itself: tests/test_resume_cli.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_revrnn.callbacks import ResumeCheckpoint
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
]


def _fit(folder: Path, **trainer: Any) -> dict[str, Any]:
    """Fit a tiny LM with ResumeCheckpoint(every 4 steps); return its last.ckpt."""
    torch.manual_seed(0)
    model = LanguageModel(16, rnn="revgru", emb_size=8, hidden_size=8, optimizer=partial(torch.optim.SGD, lr=0.5))
    data = SyntheticLMDataModule(
        vocab_size=16, train_tokens=800, val_tokens=160, test_tokens=160, batch_size=4, eval_batch_size=4, bptt=10
    )  # 19 windows an epoch
    pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        callbacks=[ResumeCheckpoint(str(folder), every_n_train_steps=4)],
        **trainer,
    ).fit(model, data)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    return dict(torch.load(folder / "last.ckpt", weights_only=False))


def _state(checkpoint: dict[str, Any]) -> tuple[int, int, int]:
    """(global step, batches done in the current epoch, epochs the fit loop counts as completed)."""
    loops = checkpoint["loops"]["fit_loop"]
    return (
        checkpoint["global_step"],
        loops["epoch_loop.batch_progress"]["current"]["completed"],
        loops["epoch_progress"]["current"]["completed"],
    )


def test_max_steps_stop_is_saved_inside_the_epoch(tmp_path: Path) -> None:
    # step 6 is no multiple of 4; the train-epoch end the stop triggers writes nothing (it would say "finished")
    assert _state(_fit(tmp_path, max_steps=6)) == (6, 5, 0)  # completed lags one behind inside on_train_batch_end


def test_the_last_batch_of_the_last_epoch_is_saved_before_its_validation(tmp_path: Path) -> None:
    assert _state(_fit(tmp_path, max_epochs=2, limit_train_batches=5)) == (10, 4, 1)


def test_every_n_train_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_n_train_steps"):
        ResumeCheckpoint(every_n_train_steps=0)
