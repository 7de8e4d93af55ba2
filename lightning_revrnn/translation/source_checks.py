"""The check that every source row has a token: an empty source sentence has nothing to encode or attend to.

Attention over a memory with no real position is a softmax over nothing but ``-inf`` (NaN), so one empty row
would turn a batch's loss into NaN and its decoding into garbage (greedy: ``max_decode_len`` times ``<unk>``;
beam: the empty string). The models refuse such a row with a :class:`ValueError` naming it, in the reversible
and the baseline path alike. The DataModules never serve one (:class:`~lightning_revrnn.datamodules.translation.
TranslationDataModule` drops empty training pairs and refuses empty evaluation pairs).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

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
