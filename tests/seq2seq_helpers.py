"""Shared pieces of the translation model tests: the synthetic translation DataModule at test size,
hand-made padded batches, and a tiny :class:`~lightning_revrnn.translation.model.TranslationModel`. Also imported by
the DDP test's spawned ranks, so it must stay importable from ``tests/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_revrnn.datamodules.translation import (
    BOS,
    EOS,
    PAD,
    SyntheticTranslationDataModule,
    TranslationBatch,
)
from lightning_revrnn.translation.model import RnnType, TranslationModel


def synthetic_data(batch_size: int = 8, train_size: int = 48) -> SyntheticTranslationDataModule:
    """The embedded reversed word-substitution task at test size: 8 words per language (vocabularies of 12
    ids), sentences of 1-9 words (targets cross no chunk: the gradient tests cover that), 12 validation and
    12 test pairs."""
    return SyntheticTranslationDataModule(
        vocab=8, min_len=1, max_len=9, train_size=train_size, val_size=12, test_size=12, batch_size=batch_size
    )


def padded_batch(src_lengths: list[int], tgt_lengths: list[int], vocab: int, seed: int = 0) -> TranslationBatch:
    """A right-padded batch with the given lengths (target lengths without EOS), random words (ids >= 4)."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)  # REVRNN_TEST_DEVICE=cuda: on the GPU
    B, S, T = len(src_lengths), max(src_lengths), max(tgt_lengths) + 1
    src_keep = torch.arange(S)[:, None] < torch.tensor(src_lengths)[None]
    tgt_keep = torch.arange(T)[:, None] <= torch.tensor(tgt_lengths)[None]
    src = torch.randint(4, vocab, (S, B), generator=g).masked_fill(~src_keep, PAD)
    words = torch.randint(4, vocab, (T, B), generator=g)
    tgt_out = words.clone()
    tgt_out[torch.tensor(tgt_lengths), torch.arange(B)] = EOS
    tgt_in = torch.cat([torch.full((1, B), BOS), words[:-1]])
    return TranslationBatch(
        src=src,
        src_keep=src_keep,
        tgt_in=tgt_in.masked_fill(~tgt_keep, PAD),
        tgt_out=tgt_out.masked_fill(~tgt_keep, PAD),
        tgt_keep=tgt_keep,
        sources=["x"] * B,
        references=["y"] * B,
        indices=list(range(B)),
    )


def tiny_model(rnn: str = "revgru", seed: int = 0, vocab: int | None = 13, **kwargs: Any) -> TranslationModel:
    """A tiny TranslationModel, deterministically initialised (``vocab=None``: sizes from the DataModule)."""
    torch.manual_seed(seed)
    args: dict[str, Any] = dict(hidden_size=8, embedding_size=6, num_layers=1, slice_dim=3, beam=3, max_decode_len=12)
    args.update(kwargs)
    if vocab is not None:
        args.update(src_vocab_size=vocab, tgt_vocab_size=vocab)
    return TranslationModel(cast(RnnType, rnn), **args)  # a test's parameter (a string); the model validates it


def grads_of(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter's gradient by name (zeros where none arrived)."""
    return {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()
    }


def trained_synthetic(root: Path) -> tuple[TranslationModel, SyntheticTranslationDataModule, Path]:
    """A small RevGRU model trained 150 steps on the synthetic task (about 5 s on one core; test BLEU about 35),
    its DataModule, and its checkpoint saved from Python (``root/synthetic.ckpt``)."""
    with torch.device("cpu"):
        pl.seed_everything(0, verbose=False)
        model = tiny_model(
            vocab=None,
            hidden_size=16,
            embedding_size=8,
            slice_dim=4,
            dropout=0.0,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.02),
        )
        data = synthetic_data(batch_size=16, train_size=400)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=150,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, data)
        trainer.save_checkpoint(root / "synthetic.ckpt")
    return model, data, root / "synthetic.ckpt"
