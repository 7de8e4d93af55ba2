"""The language model's output head: locked output dropout, the tied decoder and the summed cross-entropy,
run a chunk of steps at a time inside the reverse sweep."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_revrnn.core.dropout import locked_mask
from lightning_revrnn.core.protocol import StepHead


class DecoderHead(nn.Module):
    """Locked output dropout, (tied) decoder and summed cross-entropy of a chunk of steps (-100 ignored).

    It holds no per-batch state: :meth:`bind` takes one window's targets, draws its output dropout mask and
    returns the :class:`BoundDecoderHead` (a :class:`~lightning_revrnn.core.protocol.StepHead`) that reads them,
    which is what the sequence module runs. The bound head shares this head's decoder (the same parameters, so
    a decoder weight tied to the embedding stays one tensor).

    Args:
        decoder: the output layer ``emb -> vocabulary`` (its weight may be the embedding's).
        dropout: locked output dropout (one mask per window) on the last layer's outputs.

    Example::

        >>> import torch
        >>> from lightning_revrnn import EmbeddingStem, RevGRU
        >>> embedding = nn.Embedding(10, 4)
        >>> decoder = nn.Linear(4, 10)
        >>> decoder.weight = embedding.weight  # tied
        >>> stem, head = EmbeddingStem(embedding, dropout=0.1), DecoderHead(decoder, dropout=0.4)
        >>> rnn = RevGRU(input_size=4, hidden_size=4)
        >>> tokens, targets = torch.randint(0, 10, (6, 2)), torch.randint(0, 10, (6, 2))
        >>> # training: bind anew for every window (the language model binds the stem first, then the head)
        >>> window_stem = stem.bind(training=True)
        >>> window_head = head.bind(targets, training=True)
        >>> loss_sum, h_n = rnn(tokens, None, head=window_head, stem=window_stem)
        >>> loss_sum.backward()  # the summed cross-entropy of the window's 12 tokens
        >>> decoder.weight is embedding.weight, embedding.weight.grad.shape  # one tensor, one gradient
        (True, torch.Size([10, 4]))
        >>> # evaluation: no dropout; the logits of outputs computed outside the sweep
        >>> with torch.no_grad():
        ...     out, h_n = rnn(stem.bind(training=False)(tokens))
        ...     logits = head.bind(targets, training=False).logits(out)
        >>> logits.shape
        torch.Size([6, 2, 10])
    """

    def __init__(self, decoder: nn.Linear, dropout: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.dropout = dropout

    def bind(self, targets: Tensor, training: bool) -> BoundDecoderHead:
        """The head of one window with targets ``(T, B)``: its output dropout mask drawn now from the global RNG
        (none in evaluation)."""
        w = self.decoder.weight
        mask = locked_mask((targets.shape[1], w.shape[1]), self.dropout, w) if training else None
        return BoundDecoderHead(self.decoder, targets, mask)


class BoundDecoderHead(StepHead):
    """:class:`DecoderHead` bound to one window's targets ``(T, B)`` and output dropout mask ``(B, emb)``
    (None: no dropout). Its decoder is the unbound head's (same parameters)."""

    def __init__(self, decoder: nn.Linear, targets: Tensor, mask: Tensor | None) -> None:
        super().__init__()
        self.decoder = decoder
        self.targets = targets
        self.mask = mask

    def logits(self, output: Tensor) -> Tensor:
        """Decoder logits of outputs ``(..., B, emb)`` after output dropout."""
        return self.decoder(output if self.mask is None else output * self.mask)

    @override
    def forward(self, output: Tensor, start: int) -> Tensor:
        targets = self.targets[start : start + output.shape[0]]
        logits = self.logits(output)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
