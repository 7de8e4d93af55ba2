"""The DataModules driven by a real ``pl.Trainer``: epochs, reset flags, validation with variable BPTT."""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_revrnn.datamodules import CopyTasksDataModule, SyntheticLMDataModule


class _Recorder(pl.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 4)
        self.out = torch.nn.Linear(4, vocab_size)
        self.seen: list[tuple[str, int, int, bool]] = []

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self.out(self.emb(batch["inputs"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert isinstance(batch["reset"], bool)
        self.seen.append(("train", self.current_epoch, batch["inputs"].shape[0], batch["reset"]))
        return self._loss(batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.seen.append(("val", self.current_epoch, batch["inputs"].shape[0], batch["reset"]))
        self.log("val_loss", self._loss(batch), batch_size=batch["inputs"].shape[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm: pl.LightningDataModule, vocab_size: int, epochs: int) -> _Recorder:
    model = _Recorder(vocab_size)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    return model


def test_variable_bptt_follows_trainer_epoch_and_validation_runs_every_epoch() -> None:
    kwargs: dict[str, Any] = dict(
        train_tokens=4000,
        val_tokens=1000,
        test_tokens=1000,
        batch_size=4,
        eval_batch_size=4,
        bptt=20,
        variable_bptt=True,
        seed=5,
    )
    model = _fit(SyntheticLMDataModule(**kwargs), 32, epochs=3)
    reference = SyntheticLMDataModule(**kwargs)
    reference.setup("fit")
    ds = reference.dataset("train")
    for epoch in range(3):
        train = [(t, r) for kind, e, t, r in model.seen if kind == "train" and e == epoch]
        assert [t for t, _ in train] == ds.lengths(epoch)  # lengths drawn with seed + trainer.current_epoch
        assert [r for _, r in train] == [True] + [False] * (len(train) - 1)
        val = [(t, r) for kind, e, t, r in model.seen if kind == "val" and e == epoch]
        assert val and val[0][1] and all(t == 20 for t, _ in val[:-1])


def test_copy_task_through_trainer() -> None:
    model = _fit(CopyTasksDataModule("remember", train_batches=4, val_batches=2, batch_size=8), 16, epochs=2)
    assert sum(1 for kind, *_ in model.seen if kind == "train") == 8
    assert all(r for *_, r in model.seen)
