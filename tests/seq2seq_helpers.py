"""Shared pieces of the translation model tests: a tiny seeded translation DataModule, hand-made padded
batches, and a tiny :class:`~lightning_revrnn.seq2seq.TranslationModel`. Also imported by the DDP test's
spawned ranks, so it must stay importable from ``tests/``."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from lightning_revrnn.datamodules.parallel import ParallelText, TranslationBatch
from lightning_revrnn.datamodules.translation_datamodule import TranslationDataModule
from lightning_revrnn.datamodules.vocabulary import BOS, EOS, PAD, TranslationVocabulary
from lightning_revrnn.seq2seq import TranslationModel

SRC_WORDS = [f"w{i}" for i in range(8)]


class TinyTranslationData(TranslationDataModule):
    """Seeded pairs ``w3 w1 w5`` → ``W5 W1 W3`` (target words mapped and reversed, so attention helps), 1-9
    tokens; ``train_pairs`` training pairs, 12 validation and 12 test pairs."""

    tgt_lang = "de"

    def __init__(self, batch_size: int = 8, train_pairs: int = 48, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.train_pairs = train_pairs

    def read_split(self, split: str) -> ParallelText:
        rng = random.Random(f"{split}:{self.seed}")
        sources, targets = [], []
        for _ in range(self.train_pairs if split == "train" else 12):
            words = [rng.choice(SRC_WORDS) for _ in range(rng.randint(1, 9))]
            sources.append(" ".join(words))
            targets.append(" ".join(w.upper() for w in reversed(words)))
        return ParallelText(sources, targets)


def padded_batch(src_lengths: list[int], tgt_lengths: list[int], vocab: int, seed: int = 0) -> TranslationBatch:
    """A right-padded batch with the given lengths (target lengths without EOS), random words (ids >= 4)."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = len(src_lengths), max(src_lengths), max(tgt_lengths) + 1
    src_keep = torch.arange(S)[:, None] < torch.tensor(src_lengths)[None]
    tgt_keep = torch.arange(T)[:, None] <= torch.tensor(tgt_lengths)[None]
    src = torch.randint(4, vocab, (S, B), generator=g).masked_fill(~src_keep, PAD)
    words = torch.randint(4, vocab, (T, B), generator=g)
    tgt_out = words.clone()
    tgt_out[torch.tensor(tgt_lengths), torch.arange(B)] = EOS
    tgt_in = torch.cat([torch.full((1, B), BOS), words[:-1]])
    return TranslationBatch(
        src=src, src_keep=src_keep, tgt_in=tgt_in.masked_fill(~tgt_keep, PAD), tgt_out=tgt_out.masked_fill(~tgt_keep, PAD),
        tgt_keep=tgt_keep, sources=["x"] * B, references=["y"] * B, indices=list(range(B)),
    )


def tiny_model(rnn: str = "revgru", seed: int = 0, vocab: int | None = 13, **kwargs: Any) -> TranslationModel:
    """A tiny TranslationModel, deterministically initialised (``vocab=None``: sizes from the DataModule)."""
    torch.manual_seed(seed)
    args: dict[str, Any] = dict(hidden_size=8, embedding_size=6, num_layers=1, slice_dim=3, beam=3, max_decode_len=12)
    args.update(kwargs)
    if vocab is not None:
        args.update(src_vocab_size=vocab, tgt_vocab_size=vocab)
    return TranslationModel(rnn, **args)


def word_vocab(size: int) -> TranslationVocabulary:
    """A vocabulary of ``size`` ids whose words are ``t4 .. t{size-1}``."""
    return TranslationVocabulary(["<pad>", "<unk>", "<s>", "</s>", *(f"t{i}" for i in range(4, size))])


def grads_of(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter's gradient by name (zeros where none arrived)."""
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
