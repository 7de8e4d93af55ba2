"""Translating raw text with a trained :class:`~lightning_revrnn.translation.model.TranslationModel`: the training
corpus's preprocessing, batched beam search, attention-based ``<unk>`` replacement, detokenisation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from lightning_revrnn.datamodules.preprocessing import TextPreprocessing
from lightning_revrnn.datamodules.translation import PAD, UNK, TranslationVocabulary


class TextTranslator(Protocol):
    """What :func:`translate_text` needs of a translation model."""

    src_vocab: TranslationVocabulary | None
    tgt_vocab: TranslationVocabulary | None
    preprocessing: TextPreprocessing | None
    training: bool

    @property
    def device(self) -> torch.device: ...

    def translate(self, src: Tensor, src_keep: Tensor, beam: int | None = None) -> list[list[int]]: ...

    def attended_positions(self, src: Tensor, src_keep: Tensor, hypotheses: Sequence[list[int]]) -> Tensor: ...

    def eval(self) -> object: ...

    def train(self, mode: bool = True) -> object: ...


def translate_text(
    model: TextTranslator, sentences: Sequence[str], beam: int | None, replace_unk: bool, batch_size: int
) -> list[str]:
    """Translate raw sentences: one detokenised translation per sentence, in order.

    Each sentence is prepared as the training corpus was (the model's ``preprocessing``, declared by the DataModule
    and kept in the checkpoint: e.g. Multi30K lower-cases and Moses-tokenises, the synthetic task splits at
    whitespace), decoded with beam search (``beam``; default the model's, 1 is greedy) in batches of
    ``batch_size`` sentences of similar length, and detokenised. With ``replace_unk`` (default) every
    ``<unk>`` of a translation is replaced by the source token the decoder attended to most when it emitted it
    (the classic attention-based unknown-word replacement); ``replace_unk=False`` keeps ``<unk>``.

    Raises:
        ValueError: a sentence is empty (after preprocessing), naming it; or the model has no vocabularies or
            no preprocessing (set by a translation DataModule or a checkpoint).
        TypeError: ``sentences`` is one string, not a list of them.
    """
    if isinstance(sentences, str):
        raise TypeError("translate_text takes a list of sentences; wrap a single sentence in a list: [sentence].")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    preprocessing, tgt_vocab = text_settings(model)
    tokens = []
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(f"sentence {i} is {type(sentence).__name__}, not str: {sentence!r}.")
        tokens.append(preprocessing.tokenize(sentence, "src"))
    empty = [i for i, words in enumerate(tokens) if not words]
    if empty:
        raise ValueError(
            f"sentence {empty[0]} ({sentences[empty[0]]!r}) is empty (no tokens after preprocessing); "
            f"{len(empty)} of {len(tokens)} sentences are empty (indices {empty[:10]}). A translation needs at "
            "least one source word: drop or fill the empty sentences."
        )
    src_vocab = model.src_vocab
    assert src_vocab is not None
    order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))  # similar lengths batch together
    out = [""] * len(tokens)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            src, src_keep = source_batch([src_vocab.encode(tokens[i]) for i in rows], model.device)
            hypotheses = model.translate(src, src_keep, beam=beam)
            attended = (
                model.attended_positions(src, src_keep, hypotheses)
                if replace_unk and any(UNK in h for h in hypotheses)
                else None
            )
            for r, (i, ids) in enumerate(zip(rows, hypotheses)):
                words = [tgt_vocab[t] for t in ids]
                if attended is not None:
                    words = [
                        tokens[i][int(attended[j, r])] if t == UNK else w for j, (t, w) in enumerate(zip(ids, words))
                    ]
                out[i] = preprocessing.detokenize(words, "tgt")
    finally:
        model.train(was_training)
    return out


def text_settings(model: TextTranslator) -> tuple[TextPreprocessing, TranslationVocabulary]:
    """The model's text preprocessing and target vocabulary, or a ``ValueError`` naming what is missing."""
    if model.src_vocab is None or model.tgt_vocab is None:
        raise ValueError(
            "TranslationModel has no vocabularies to translate text with. Fix: load it from a checkpoint written "
            "after training (TranslationModel.load_from_checkpoint), run it in a Trainer with a translation "
            "DataModule first, or call set_vocabularies()."
        )
    if model.preprocessing is None:
        raise ValueError(
            "TranslationModel does not know how its training text was preprocessed (a checkpoint from before "
            "preprocessing was saved, or vocabularies set by hand). Fix: set it, e.g. "
            "`model.preprocessing = Multi30KDataModule().preprocessing` (lightning_revrnn.datamodules), or run "
            "the model once in a Trainer with its DataModule."
        )
    return model.preprocessing, model.tgt_vocab


def source_batch(ids: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded source ids ``(S, B)`` and their mask, on ``device``."""
    length = max(len(row) for row in ids)
    src = torch.full((length, len(ids)), PAD, dtype=torch.long)
    for b, row in enumerate(ids):
        src[: len(row), b] = torch.tensor(row, dtype=torch.long)
    return src.to(device), (src != PAD).to(device)
