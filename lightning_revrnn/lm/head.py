"""The language model's output head: locked output dropout, the tied decoder and the summed cross-entropy,
run a chunk of steps at a time inside the reverse sweep."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_revrnn.core.dropout import locked_mask
from lightning_revrnn.core.protocol import StepHead


class DecoderHead(StepHead):
    """Locked output dropout, (tied) decoder and summed cross-entropy of a chunk of steps (-100 ignored)."""

    def __init__(self, decoder: nn.Linear, dropout: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.dropout = dropout
        self.targets: Tensor | None = None
        self.mask: Tensor | None = None

    def prepare(self, targets: Tensor, training: bool) -> None:
        """Set this window's targets ``(T, B)`` and output dropout mask."""
        self.targets = targets
        w = self.decoder.weight
        self.mask = locked_mask((targets.shape[1], w.shape[1]), self.dropout, w) if training else None

    def logits(self, output: Tensor) -> Tensor:
        """Decoder logits of outputs ``(..., B, emb)`` after output dropout."""
        return self.decoder(output if self.mask is None else output * self.mask)

    @override
    def forward(self, output: Tensor, start: int) -> Tensor:
        assert self.targets is not None, "DecoderHead.prepare() sets the targets first"
        targets = self.targets[start : start + output.shape[0]]
        logits = self.logits(output)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
