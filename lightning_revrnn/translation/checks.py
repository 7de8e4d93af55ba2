"""The translation model's checks of what it is given: settings, vocabularies and source rows.

**Source rows.** Every source row must have a token: an empty source sentence has nothing to encode or attend to.

Attention over a memory with no real position is a softmax over nothing but ``-inf`` (NaN), so one empty row
would turn a batch's loss into NaN and its decoding into garbage (greedy: ``max_decode_len`` times ``<unk>``;
beam: the empty string). The models refuse such a row with a :class:`ValueError` naming it, in the reversible
and the baseline path alike. The DataModules never serve one (:class:`~lightning_revrnn.datamodules.translation.
TranslationDataModule` drops empty training pairs and refuses empty evaluation pairs).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_revrnn.datamodules.translation import TranslationVocabulary

#: The reversible encoder/decoder types, the baselines and the attention memories a model can be built with.
REVERSIBLE_RNNS = ("revgru", "revlstm")
BASELINES = ("gru", "lstm")
CONTEXTS = ("slice", "emb", "emb+slice", "hidden")

#: Rows listed in the message before "and N more".
_LISTED = 5
#: What the error asks the user to do.
FIX = (
    "Fix: give every row at least one source token (drop the empty sentences from your data; "
    "TranslationDataModule drops them from training and refuses them in validation/test)."
)


def empty_source_rows(src_keep: Tensor) -> Tensor:
    """The number of rows (columns of the ``(S, B)`` mask ``src_keep``) without a real token, on the mask's
    device (no host read)."""
    return (~src_keep.any(0)).sum()


def check_source_rows(src_keep: Tensor, lengths: Tensor | None = None, indices: Sequence[int] | None = None) -> None:
    """Raise :class:`ValueError` naming every row of ``src_keep`` ``(S, B)`` that has no real source token.

    ``lengths``: the rows' source lengths ``(B,)`` when the caller already has them on the host (then the
    check reads nothing from the device); ``indices``: each row's pair in its split, named in the message.
    Without ``lengths`` this reads the mask's per-row verdict from the device once.
    """
    if src_keep.ndim != 2:
        raise ValueError(
            f"src_keep must be a (S, B) bool mask of real source tokens, got shape {tuple(src_keep.shape)}."
        )
    lengths = src_keep.sum(0) if lengths is None else lengths
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(empty_rows_message(empty, int(src_keep.shape[1]), indices))


def empty_rows_message(empty: Sequence[int], batch: int, indices: Sequence[int] | None = None) -> str:
    """The error message for the empty source rows ``empty`` of a batch of ``batch`` rows."""

    def name(row: int) -> str:
        return f"{row} (pair {indices[row]} of its split)" if indices is not None and row < len(indices) else str(row)

    listed = ", ".join(name(row) for row in empty[:_LISTED])
    listed += f" and {len(empty) - _LISTED} more" if len(empty) > _LISTED else ""
    return (
        f"source row {listed} of the batch ({len(empty)} of {batch} rows; the columns of src_keep, from 0) has no "
        "real token. An empty source sentence has nothing to encode or attend to: its loss and its "
        f"translation would be NaN. {FIX}"
    )


#: What a non-finite training loss asks the user to do.
NONFINITE_FIX = (
    "check that batch for pairs the model cannot take (a DataModule of your own must drop empty sentences, as "
    "TranslationDataModule does), lower the learning rate or clip gradients (the configs use "
    "Trainer(gradient_clip_val=5)), then resume from the last checkpoint."
)
MODEL_FIX = (
    "build the DataModule with the data and vocabulary settings the model was trained with (the same corpus, "
    "min_freq, max_vocab, max_len; for the synthetic task the same sizes and seed), or hand it the model's "
    "vocabularies before the Trainer sets it up: `data.src_vocab, data.tgt_vocab = model.src_vocab, model.tgt_vocab` "
    "(words they lack become <unk>)"
)
CHECKPOINT_FIX = (
    "build the DataModule with the data and vocabulary settings of the run that wrote the checkpoint (the same "
    "corpus, min_freq, max_vocab, max_len; for the synthetic task the same sizes and seed), or hand it the "
    "checkpoint's vocabularies before the Trainer sets it up: `model = TranslationModel.load_from_checkpoint(path)`, "
    "then `data.src_vocab, data.tgt_vocab = model.src_vocab, model.tgt_vocab` (words they lack become <unk>)"
)


def check_same_vocabularies(
    ours: tuple[TranslationVocabulary, TranslationVocabulary],
    theirs: tuple[TranslationVocabulary, TranslationVocabulary],
    names: tuple[str, str],
    fix: str,
) -> None:
    """Raise ``ValueError`` unless the (source, target) vocabularies ``ours`` and ``theirs`` (labelled ``names``)
    are the same tokens in the same order, saying what differs and the ``fix``. Every DDP rank builds the same
    vocabularies from the same data, so every rank raises alike."""
    differences = [
        f"{side} vocabulary: {mine.difference(other, names)}"
        for side, mine, other in zip(("src", "tgt"), ours, theirs)
        if mine != other
    ]
    if differences:
        raise ValueError(
            f"TranslationModel: the vocabularies of {names[1]} differ from {names[0]}'s, so the same ids would mean "
            "other words (training, loss, decoding and BLEU would silently use the wrong ones). "
            f"{'; '.join(differences)}. Fix: {fix}."
        )


def check_arguments(
    rnn: str,
    hidden_size: int,
    context: str,
    slice_dim: int,
    beam: int,
    max_decode_len: int,
    embedding_size: int = 1,
    num_layers: int = 1,
    dropout: float = 0.0,
) -> None:
    """Raise on settings the model cannot run with, naming the argument and the fix."""
    if rnn not in REVERSIBLE_RNNS and rnn not in BASELINES:
        raise ValueError(f"rnn must be one of {sorted([*REVERSIBLE_RNNS, *BASELINES])}, got {rnn!r}.")
    for name, value in (("embedding_size", embedding_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"TranslationModel({name}={value!r}): {name} must be a positive integer.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"TranslationModel(dropout={dropout!r}): dropout must be in [0, 1).")
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}.")
    if rnn in REVERSIBLE_RNNS and hidden_size % 2:
        raise ValueError(
            f"Reversible cells split the state into two halves: hidden_size must be even, got {hidden_size}."
        )
    if "slice" in context and not 1 <= slice_dim <= hidden_size // 2:
        raise ValueError(
            f"slice_dim={slice_dim} with context={context!r}: the slice is taken from the top layer's h1, "
            f"so it needs 1 <= slice_dim <= hidden_size // 2 = {hidden_size // 2}. Fix: a smaller slice_dim, or "
            "context='hidden' to attend over the whole state."
        )
    if beam < 1 or max_decode_len < 1:
        raise ValueError(
            f"beam and max_decode_len must be at least 1, got beam={beam}, max_decode_len={max_decode_len}."
        )
