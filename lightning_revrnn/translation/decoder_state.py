"""The state a translation decoder carries from one decoding step to the next, and its beam reordering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor


@dataclass
class DecoderState:
    """What one decoding step reads per row (sentence or beam): the decoder state (reversible: exact
    float64, as ``rnn.exact_state`` returns it; baselines: ``nn.GRU``/``nn.LSTM`` states per layer), the
    attention memory ``(S, N, D)`` and the source padding mask ``(S, N)``. Every tensor's dimension 1 is
    the row."""

    hidden: Any
    memory: Tensor
    memory_keep: Tensor

    def select(self, rows: Tensor) -> DecoderState:
        """The state of rows ``rows`` (beam reordering / expansion): ``DecoderState.select`` is the decoding
        functions' ``ReorderFn`` (:mod:`lightning_revrnn.translation.decoding`)."""

        def pick(t: Tensor) -> Tensor:
            return t.index_select(1, rows)

        hidden = apply_to_collection(self.hidden, Tensor, pick)
        return DecoderState(hidden, pick(self.memory), pick(self.memory_keep))
