"""The language model's output head: locked output dropout, the tied decoder and the summed cross-entropy,
run a chunk of steps at a time inside the reverse sweep.

With a byte budget (``block_bytes``, the reversible models' default) the decoder and cross-entropy run a block
of rows at a time (:mod:`lightning_revrnn.chunked_loss`): no ``C × B × vocab`` logits tensor exists, and in the
reverse sweep the decoder's weight and bias gradients are added straight into the sweep's accumulators (the
tied embedding's included), so no ``vocab × emb`` gradient temporary exists either. ``block_bytes=None`` is
the plain ``nn.Linear`` + ``F.cross_entropy`` (the baselines: what a user would write).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_revrnn.chunked_loss import DEFAULT_BLOCK_BYTES, linear_cross_entropy, linear_cross_entropy_into
from lightning_revrnn.core.dropout import locked_mask
from lightning_revrnn.core.protocol import StepHead, add_gradients

#: Target positions the loss ignores (``F.cross_entropy``'s ``ignore_index``).
IGNORE = -100


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

    def __init__(self, decoder: nn.Linear, dropout: float, block_bytes: int | None = DEFAULT_BLOCK_BYTES) -> None:
        super().__init__()
        self.decoder = decoder
        self.dropout = dropout
        self.block_bytes = block_bytes

    def bind(self, targets: Tensor, training: bool) -> BoundDecoderHead:
        """The head of one window with targets ``(T, B)``: its output dropout mask drawn now from the global RNG
        (none in evaluation)."""
        w = self.decoder.weight
        mask = locked_mask((targets.shape[1], w.shape[1]), self.dropout, w) if training else None
        return BoundDecoderHead(self.decoder, targets, mask, self.block_bytes)


class BoundDecoderHead(StepHead):
    """:class:`DecoderHead` bound to one window's targets ``(T, B)`` and output dropout mask ``(B, emb)``
    (None: no dropout). Its decoder is the unbound head's (same parameters); ``block_bytes``: the budget of the
    blockwise decoder + cross-entropy (None: plain)."""

    def __init__(
        self, decoder: nn.Linear, targets: Tensor, mask: Tensor | None, block_bytes: int | None = DEFAULT_BLOCK_BYTES
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.targets = targets
        self.mask = mask
        self.block_bytes = block_bytes

    def dropped(self, output: Tensor) -> Tensor:
        """Outputs ``(..., B, emb)`` after output dropout."""
        return output if self.mask is None else output * self.mask

    def logits(self, output: Tensor) -> Tensor:
        """Decoder logits of outputs ``(..., B, emb)`` after output dropout (evaluation metrics)."""
        logits: Tensor = self.decoder(self.dropped(output))
        return logits

    @override
    def forward(self, output: Tensor, start: int) -> Tensor:
        targets = self.targets[start : start + output.shape[0]].flatten()
        if self.block_bytes is None:
            logits = self.logits(output).flatten(0, 1)
            return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        x = self.dropped(output).flatten(0, 1)
        return linear_cross_entropy(x, self.decoder.weight, self.decoder.bias, targets, IGNORE, self.block_bytes)

    @override
    def accumulate_grads(
        self, output: Tensor, start: int, d_value: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> Tensor | None:
        """Reverse sweep, once per chunk: the gradient of ``forward(output, start) · d_value`` with respect to
        ``output``. The decoder's weight and bias gradients go straight into their accumulators, a block of rows
        at a time (:func:`~lightning_revrnn.chunked_loss.linear_cross_entropy_into`): no ``C × B × vocab``
        logits and no ``vocab × emb`` gradient per chunk."""
        if self.block_bytes is None:
            return super().accumulate_grads(output, start, d_value, targets)
        flat_targets = self.targets[start : start + output.shape[0]].flatten()
        x = self.dropped(output).flatten(0, 1)  # graph: output (and the dropout mask)
        d_x = linear_cross_entropy_into(x, self.decoder, flat_targets, d_value, targets, IGNORE, self.block_bytes)
        weight, bias = self.decoder.weight, self.decoder.bias
        rest = [(t, acc) for t, acc in targets if t is not weight and t is not bias]
        grads = torch.autograd.grad(x, [output, *[t for t, _ in rest]], d_x, allow_unused=True)
        add_gradients(rest, grads[1:])
        return grads[0]
