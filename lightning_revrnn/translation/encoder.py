"""The translation encoders: reversible ones that account for the attention units they store, and the
``nn.GRU``/``nn.LSTM`` baseline, packed so that padding never changes an example's final state.

The attention memory of a reversible encoder is a *stored* slice of its top layer's ``h1`` per step (spec
section 5): those units are not reconstructed but kept, 32 bits per unit and step, on top of the
information buffer. The core's ``ReversibleRNN(stored_units=...)`` stores such a slice itself (returning
only those units: the rest of the top state is never kept) and counts it as ``stored_bits``.
:class:`StoredUnitsAccounting` adds what the core does not store: the whole top state of
``context="hidden"`` (the core stores at most half of it, so that encoder returns its full outputs), so
that :class:`~lightning_revrnn.callbacks.MemoryReport` reports the encoder with every unit it stores.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from typing_extensions import override

from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.dropout import locked_mask
from lightning_revrnn.core.rnn import ReversibleRNN, RevGRU, RevLSTM
from lightning_revrnn.shared import BaselineRNN
from lightning_revrnn.translation.checks import check_source_rows

#: Bits per stored unit and step (float32).
STORED_UNIT_BITS = 32


def stored_units_of(outputs: Tensor, units: int) -> Tensor:
    """The stored attention units ``(S, B, units)`` from an encoder's first return value: the reversible
    encoder's stored units (or whole outputs, for ``context="hidden"``) as they are, or the first ``units``
    features of a baseline's outputs ``(S, B, H)``."""
    return outputs if outputs.shape[-1] == units else outputs[..., :units]


class StoredUnitsAccounting(ReversibleRNN):
    """Adds the attention units the core does not store to the paper's accounting of a reversible encoder.

    ``attention_units`` (set by :func:`reversible_encoder`): units of the top layer stored every step (the
    slice, or the whole top state for ``context="hidden"``). Each training forward records its ``T × B``
    steps (padded ones included, as ``normal_bits`` counts them); :meth:`memory_stats` adds
    ``32 · units · T · B`` bits as ``stored_bits`` to ``used_bits`` and ``optimal_bits`` (spec section 4),
    of the total and of the top layer, for the units the core's accounting does not already count
    (:attr:`units_stored_outside_the_core`).
    """

    attention_units: int = 0
    _stored_steps: int = 0

    @property
    def units_stored_outside_the_core(self) -> int:
        """Attention units per step the core's own ``stored_units`` does not count: none for a slice, the
        whole state for ``context="hidden"`` (whose outputs the encoder returns instead of storing units,
        since ``stored_units`` stops at half the state)."""
        return self.attention_units - self.stored_units

    @override
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        result = super().forward(x, *args, **kwargs)
        if torch.is_grad_enabled():  # memory_stats() describes the last forward with gradients
            self._stored_steps = int(x.shape[0]) * int(x.shape[1])
        return result

    @override
    def memory_stats(self) -> MemoryAccounting:
        stats = super().memory_stats()
        stored = STORED_UNIT_BITS * self.units_stored_outside_the_core * self._stored_steps
        if stored == 0:
            return stats
        *lower, top = stats.layers
        return replace(with_stored_bits(stats, stored), layers=(*lower, with_stored_bits(top, stored)))


def with_stored_bits(stats: MemoryAccounting, stored: int) -> MemoryAccounting:
    """``stats`` with ``stored`` bits added to its stored, used and optimal bits."""
    return replace(
        stats,
        stored_bits=stats.stored_bits + stored,
        used_bits=stats.used_bits + stored,
        optimal_bits=stats.optimal_bits + stored,
    )


class RevGRUEncoder(StoredUnitsAccounting, RevGRU):
    """A :class:`~lightning_revrnn.core.rnn.RevGRU` encoder whose accounting includes its stored attention units."""


class RevLSTMEncoder(StoredUnitsAccounting, RevLSTM):
    """A :class:`~lightning_revrnn.core.rnn.RevLSTM` encoder whose accounting includes its stored attention units."""


ENCODERS: dict[str, type[StoredUnitsAccounting]] = {"revgru": RevGRUEncoder, "revlstm": RevLSTMEncoder}


def reversible_encoder(rnn: str, stored_units: int, core_units: int, **kwargs: Any) -> StoredUnitsAccounting:
    """A reversible encoder storing ``stored_units`` top-layer units per step for attention.

    ``core_units``: the units to ask the core to store itself (``stored_units`` for a slice, 0 for the
    whole state, which the outputs already are)."""
    encoder = ENCODERS[rnn](**kwargs, stored_units=core_units)
    encoder.attention_units = stored_units
    return encoder


class BaselineEncoder(BaselineRNN):
    """``nn.GRU``/``nn.LSTM`` layers over packed sequences: each example's final state is its state after its
    own last real token, and padded steps output zeros. Locked dropout on the input and between layers."""

    def __init__(self, kind: str, input_size: int, sizes: list[int], input_dropout: float, dropout: float) -> None:
        super().__init__(kind, input_size, sizes, input_dropout, dropout, dropconnect=0.0)

    @override
    def forward(self, x: Tensor, keep: Tensor) -> tuple[Tensor, list[Any]]:  # type: ignore[override]
        """Outputs ``(S, B, H)`` and per layer the final ``h`` ``(1, B, H)`` (or ``(h, c)``) of ``x``
        ``(S, B, F)`` under the right-padding mask ``keep`` ``(S, B)``."""
        lengths = keep.sum(0).cpu()  # pack_padded_sequence needs host lengths (cuDNN does too)
        check_source_rows(keep, lengths)  # an empty row: say so, not "Length of all samples has to be > 0"
        finals = []
        for l, layer in enumerate(self.layers):
            p = self.input_dropout if l == 0 else self.dropout
            mask = locked_mask((x.shape[1], x.shape[2]), p, x) if self.training else None
            x = x if mask is None else x * mask
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, h_n = layer(packed)
            x = pad_packed_sequence(out, total_length=keep.shape[0])[0]
            finals.append(h_n)
        return x, finals
