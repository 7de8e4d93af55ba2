"""The repeat / remember copy tasks: targets, ignore positions, reset flags, epochs and sharding."""

from __future__ import annotations

import pytest
import torch
from dm_helpers import fake_trainer

from lightning_revrnn.datamodules import IGNORE_INDEX, CopyTasksDataModule


def test_repeat_targets_are_previous_inputs() -> None:
    dm = CopyTasksDataModule("repeat", vocab_size=16, seq_len=20, batch_size=32, train_batches=5, val_batches=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for b in batches:
        assert b["reset"] is True and b["inputs"].shape == b["targets"].shape == (20, 32)
        assert int(b["inputs"].min()) >= 0 and int(b["inputs"].max()) < 16
        assert bool((b["targets"][0] == IGNORE_INDEX).all())
        assert torch.equal(b["targets"][1:], b["inputs"][:-1])


def test_remember_only_last_step_targets_first_input() -> None:
    dm = CopyTasksDataModule("remember", vocab_size=8, seq_len=12, batch_size=4, train_batches=3, val_batches=2)
    dm.setup()
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for b in loader:
            assert b["reset"] is True
            assert bool((b["targets"][:-1] == IGNORE_INDEX).all())
            assert torch.equal(b["targets"][-1], b["inputs"][0])


def test_train_data_changes_per_epoch_validation_is_fixed() -> None:
    dm = CopyTasksDataModule(train_batches=2, val_batches=2)
    dm.setup()
    train = dm.train_dataloader()
    epoch0, epoch1 = [b["inputs"] for b in train], [b["inputs"] for b in train]
    assert not torch.equal(epoch0[0], epoch1[0])
    again = CopyTasksDataModule(train_batches=2, val_batches=2)
    again.setup()
    assert torch.equal(next(iter(again.train_dataloader()))["inputs"], epoch0[0])  # reproducible
    val = dm.val_dataloader()
    assert torch.equal(next(iter(val))["inputs"], next(iter(val))["inputs"])
    assert not torch.equal(next(iter(val))["inputs"], next(iter(dm.test_dataloader()))["inputs"])


def test_sharding_splits_the_global_batch() -> None:
    full = CopyTasksDataModule(batch_size=8, train_batches=3)
    full.trainer = fake_trainer(0, 1, epoch=2)  # type: ignore[assignment]
    full.setup()
    reference = [b["inputs"] for b in full.train_dataloader()]
    parts = []
    for rank in range(4):
        dm = CopyTasksDataModule(batch_size=8, train_batches=3)
        dm.trainer = fake_trainer(rank, 4, epoch=2)  # type: ignore[assignment]
        dm.setup()
        parts.append([b["inputs"] for b in dm.train_dataloader()])
    for k, ref in enumerate(reference):
        assert torch.equal(torch.cat([p[k] for p in parts], dim=1), ref)
    dm = CopyTasksDataModule(batch_size=6)
    dm.trainer = fake_trainer(0, 4)  # type: ignore[assignment]
    with pytest.raises(ValueError, match="divisible by the world size 4"):
        dm.setup()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="task"):
        CopyTasksDataModule("reverse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seq_len"):
        CopyTasksDataModule(seq_len=1)
