"""A fit interrupted mid-epoch and resumed from its checkpoint ends bit-identical to an uninterrupted fit.

Bit-equality is guaranteed here, not lucky: both runs execute the same ops on the same shapes in the same
process (same windows, same carried states, dropout masks seeded from the global step, same optimizer and
scheduler state), so every float op sees the same operands.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel
from lightning_revrnn.lm.model import RnnType

if str(Path(__file__).parent) not in sys.path:  # ddp_script is a sibling module
    sys.path.insert(0, str(Path(__file__).parent))

from ddp_script import DIST_ENV, EndProcessGroup

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]

VOCAB = 16
DROPOUT: dict[str, Any] = dict(
    dropout_emb=0.1, dropout_input=0.2, dropout_hidden=0.2, dropout_output=0.2, dropconnect=0.3
)
EPOCHS = 2


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny GEMMs gain nothing from threads, and on a loaded shared CPU two spinning threads make a step ~80x
    slower. Both runs of a test use the same setting, so bit-equality is unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Interrupted(Exception):
    """Stands for a crash or a preemption."""


class Crash(Callback):
    """Raises :class:`Interrupted` when step ``at + 1`` is about to start (after step ``at`` was saved)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            raise Interrupted(f"interrupted before step {self.at + 1}")


class Windows(Callback):
    """Records ``(epoch, batch_idx, inputs, reset)`` of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, torch.Tensor, bool]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, batch["inputs"].clone(), bool(batch["reset"])))


def _data(variable_bptt: bool) -> SyntheticLMDataModule:
    return SyntheticLMDataModule(
        vocab_size=VOCAB,
        train_tokens=600,
        val_tokens=160,
        test_tokens=160,
        batch_size=4,
        eval_batch_size=4,
        bptt=10,
        variable_bptt=variable_bptt,
        seed=7,
    )


def _model(rnn: str, seed: int) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(
        VOCAB,
        rnn=cast(RnnType, rnn),  # a test's parameter (a string); the model validates it
        num_layers=2,
        emb_size=12,
        hidden_size=16,
        optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        seed=3,
        **DROPOUT,
    )


def _fit(
    rnn: str, variable_bptt: bool, callbacks: list[Callback], ckpt_path: Path | None = None, model_seed: int = 0
) -> tuple[LanguageModel, list[warnings.WarningMessage]]:
    model = _model(rnn, model_seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _data(variable_bptt), ckpt_path=ckpt_path)
    return model, caught


@pytest.mark.parametrize(
    ("rnn", "variable_bptt", "at"),
    [
        ("revgru", True, 7),  # mid-epoch 0, AWD variable BPTT lengths
        ("revgru", True, 18),  # the last of epoch 0's 18 variable windows (the loader has no length)
        ("lstm", False, 21),  # mid-epoch 1 (15 windows per epoch), after a validation and a scheduler step
        ("revlstm", False, 15),  # the last window of epoch 0, before its validation
    ],
)
def test_mid_epoch_resume_is_bit_exact(tmp_path: Path, rnn: str, variable_bptt: bool, at: int) -> None:
    whole_windows = Windows()
    whole, _ = _fit(rnn, variable_bptt, [whole_windows])

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=at, save_top_k=-1)
    with pytest.raises(Interrupted):
        _fit(rnn, variable_bptt, [Crash(at), saver])
    (path,) = tmp_path.glob(f"*step={at}.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    (loader_state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["windows"] == whole_windows.seen[at - 1][1] + 1  # windows trained on, not prefetched

    resumed_windows = Windows()
    resumed, caught = _fit(rnn, variable_bptt, [resumed_windows], ckpt_path=path, model_seed=123)
    assert not [w for w in caught if "not resumable" in str(w.message) or "carries the hidden" in str(w.message)]
    # the resumed run sees exactly the windows the uninterrupted one saw after step `at` (batch_idx aside: after
    # a checkpoint on the last window of an unsized epoch, Lightning numbers the next epoch's batches on from it)
    tail = whole_windows.seen[at:]
    assert len(resumed_windows.seen) == len(tail)
    for (e, _, x, r), (e2, _, x2, r2) in zip(resumed_windows.seen, tail, strict=True):
        assert (e, r) == (e2, r2) and torch.equal(x, x2)
    for (name, a), (_, b) in zip(resumed.named_parameters(), whole.named_parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: max |diff| {float((a - b).abs().max())}"


def test_carried_state_is_the_one_before_the_next_window(tmp_path: Path) -> None:
    """The checkpoint holds the hidden state after the last trained window (restored on load), and a fit
    resumed from a checkpoint of another world size restarts the streams with a warning instead."""
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    with pytest.raises(Interrupted):
        _fit("revgru", False, [Crash(3), saver])
    (path,) = tmp_path.glob("*step=3.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    saved = checkpoint["revrnn_hidden"]
    assert saved["world_size"] == 1 and saved["per_rank"][0] is not None

    model = _model("revgru", 0)
    model.on_load_checkpoint(checkpoint)
    restored = model._hidden["train"]
    flat_saved = list(torch.utils._pytree.tree_leaves(saved["per_rank"][0]))
    flat_restored = list(torch.utils._pytree.tree_leaves(restored))
    assert flat_saved and all(torch.equal(a, b) for a, b in zip(flat_saved, flat_restored, strict=True))

    checkpoint["revrnn_hidden"] = {"world_size": 2, "per_rank": [saved["per_rank"][0]] * 2}
    with pytest.warns(UserWarning, match="carries the hidden state of 2 process"):
        model.on_load_checkpoint(checkpoint)
    assert "train" not in model._hidden


# ------------------------------------------------------------------------------------------------- DDP


class SaveAt(Callback):
    """Every rank saves a checkpoint after step ``at`` (the LM gathers all ranks' carries); training goes on."""

    def __init__(self, at: int, path: str) -> None:
        self.at, self.path = at, path

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            trainer.save_checkpoint(self.path)


class SaveParams(Callback):
    """Each rank writes its final parameters to ``folder/<tag>-rank<r>.pt``."""

    def __init__(self, folder: str, tag: str) -> None:
        self.folder, self.tag = folder, tag

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save(params, Path(self.folder) / f"{self.tag}-rank{trainer.global_rank}.pt")


def _ddp_fit(callbacks: list[Callback], ckpt_path: Path | None = None, model_seed: int = 0) -> None:
    # Every launch picks a new port and ends its process group (EndProcessGroup, tests/ddp_script.py).
    os.environ.pop("MASTER_PORT", None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[*callbacks, EndProcessGroup()],
    )
    trainer.fit(_model("revgru", model_seed), _data(variable_bptt=True), ckpt_path=ckpt_path)


@pytest.mark.ddp
@pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*")
def test_ddp_mid_epoch_resume_continues_every_ranks_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks each carry their own two streams; the resumed fit must give each rank its own carry back
    (rank 0's on rank 1 would change rank 1's gradients, hence the all-reduced parameters)."""
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks' torch threads (see _one_thread)
    path = tmp_path / "mid.ckpt"
    _ddp_fit([SaveAt(6, str(path)), SaveParams(str(tmp_path), "whole")])  # a checkpoint changes no number
    carried = torch.load(path, weights_only=False)["revrnn_hidden"]
    assert carried["world_size"] == 2
    rank0, rank1 = (torch.utils._pytree.tree_leaves(carried["per_rank"][r]) for r in range(2))
    assert rank0 and not all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))  # different streams
    _ddp_fit([SaveParams(str(tmp_path), "resumed")], ckpt_path=path, model_seed=123)
    for rank in range(2):
        whole = torch.load(tmp_path / f"whole-rank{rank}.pt")
        resumed = torch.load(tmp_path / f"resumed-rank{rank}.pt")
        for name, value in whole.items():
            assert torch.equal(resumed[name], value), f"rank {rank} {name}"
