"""The training loaders' iteration state: saved mid-epoch, restored into a fresh DataModule, same windows."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dm_helpers import fake_trainer, shared_corpus_dir

from lightning_revrnn.datamodules import (
    PTB_SPEC,
    CopyTasksDataModule,
    PTBDataModule,
    StreamWindowDataset,
    SyntheticLMDataModule,
)
from lightning_revrnn.datamodules.datasets import ResumableLoader


def _windows(loader: Any) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    return [(b["inputs"], b["targets"], b["reset"]) for b in loader]


def _same(a: list[tuple[torch.Tensor, torch.Tensor, bool]], b: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, x2) and torch.equal(y, y2) and r == r2 for (x, y, r), (x2, y2, r2) in zip(a, b)
    )


def test_ptb_variable_bptt_resumes_mid_epoch_in_a_fresh_datamodule() -> None:
    folder = shared_corpus_dir("ptb", list(PTB_SPEC.files.values()))
    kwargs: dict[str, Any] = dict(data_dir=folder, batch_size=20, bptt=70, variable_bptt=True, seed=11, download=False)
    dm = PTBDataModule(**kwargs)
    dm.trainer = fake_trainer(0, 1, epoch=3)  # type: ignore[assignment]
    dm.setup("fit")
    whole = _windows(dm.train_dataloader())
    assert len(whole) > 600 and len({x.shape[0] for x, _, _ in whole}) > 10  # AWD lengths, ~664 windows

    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    it = iter(loader)
    head = [next(it) for _ in range(250)]
    state = loader.state_dict()  # no trainer progress here: every yielded window counts as used
    assert (state["epoch"], state["windows"], state["finished"]) == (3, 250, False)

    again = PTBDataModule(**kwargs)
    again.trainer = fake_trainer(0, 1, epoch=3)  # type: ignore[assignment]
    again.setup("fit")
    resumed = again.train_dataloader()
    resumed.load_state_dict(state)
    rest = _windows(resumed)
    assert _same(_windows(head), whole[:250]) and _same(rest, whole[250:])
    assert not rest[0][2]  # the stream continues: no reset, the carried hidden state stays valid
    assert _same(_windows(resumed), whole)  # the restored position is used once; the next pass is whole


def test_position_counts_consumed_not_prefetched_windows() -> None:
    dm = SyntheticLMDataModule(vocab_size=8, train_tokens=800, batch_size=4, bptt=10, variable_bptt=True, seed=2)
    trainer = fake_trainer(0, 1, epoch=0)
    dm.trainer = trainer  # type: ignore[assignment]
    dm.setup("fit")
    whole = _windows(dm.train_dataloader())
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(6):
        next(it)  # training took 5, the prefetcher read a 6th
    progress = type("P", (), {"current": type("C", (), {"ready": 5})()})()
    trainer.fit_loop = type("F", (), {"epoch_loop": type("E", (), {"batch_progress": progress})()})()
    state = loader.state_dict()
    assert state["windows"] == 5
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert _same(_windows(fresh), whole[5:])


def test_restored_position_applies_only_to_its_epoch_and_a_finished_pass_continues_with_the_next() -> None:
    streams = torch.arange(200).view(50, 4)
    epoch = {"now": 1}
    ds = StreamWindowDataset(streams, 7, variable_bptt=True, seed=4, epoch_fn=lambda: epoch["now"])
    full = list(ds)
    ds.load_state_dict(
        {**StreamWindowDataset(streams, 7, True, 4).state_dict(), "epoch": 0, "windows": 3, "finished": False}
    )
    assert len(list(ds)) == len(full)  # saved in epoch 0, the trainer is in epoch 1: a whole pass
    state = ds.state_dict()
    assert state["finished"] and state["windows"] == len(full)
    ds.load_state_dict(state)
    # saved after the last window of epoch 1 while the trainer still says epoch 1: the next pass is epoch 2's
    assert [b["inputs"].shape[0] for b in ds] == ds.lengths(2) != ds.lengths(1)


def test_resuming_with_other_settings_is_refused() -> None:
    streams = torch.arange(200).view(50, 4)
    ds = StreamWindowDataset(streams, 7, variable_bptt=True, seed=4)
    it = iter(ds)
    next(it)
    state = ds.state_dict()
    for other in (
        StreamWindowDataset(streams, 8, True, 4),
        StreamWindowDataset(streams, 7, True, 5),
        StreamWindowDataset(streams, 7, False, 4),
        StreamWindowDataset(streams[:40], 7, True, 4),
    ):
        with pytest.raises(ValueError, match=r"Cannot resume StreamWindowDataset mid-epoch.*same data"):
            other.load_state_dict(state)


def test_copy_task_loader_resumes_mid_epoch() -> None:
    dm = CopyTasksDataModule("remember", train_batches=9, batch_size=8, seed=3)
    dm.trainer = fake_trainer(0, 1, epoch=2)  # type: ignore[assignment]
    dm.setup("fit")
    whole = _windows(dm.train_dataloader())
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(4):
        next(it)
    fresh = dm.train_dataloader()
    fresh.load_state_dict(loader.state_dict())
    assert _same(_windows(fresh), whole[4:])
