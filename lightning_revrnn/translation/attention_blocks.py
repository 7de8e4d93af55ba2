"""Luong "general" attention over a memory produced a block of source positions at a time, with its backward
written out: the reversible decoder's head never holds an ``S × B × D`` memory (or its gradient) at once.

The memory of a window is the source embeddings (looked up again from the token ids for every block) and/or
the stored encoder units (:class:`MemoryBlocks`). For a chunk of queries ``q`` ``(C, B, D)`` (already
multiplied by the memory's dropout mask: ``q · (m ⊙ mask) = (q ⊙ mask) · m``), :func:`attend` returns the
attention weights ``(C, B, S)`` (source padding masked) and the context ``Σ_s a_s m_s`` ``(C, B, D)`` (to be
multiplied by the mask by the caller); :func:`attend_backward` takes the context's gradient, returns the
query's and adds the memory's straight into the gradient accumulators of the embedding weight (rows by
``index_add_``) and of the stored units. Only ``C × B × S`` tensors (scores, weights: small) and one block of
the memory exist at a time. No graph is recorded: the reverse sweep's head calls these between its autograd
parts (:meth:`~lightning_revrnn.translation.attention.BoundAttentionHead.accumulate_grads`); ``mode="store"``
and the baselines use :class:`~lightning_revrnn.translation.attention.LuongAttention` on the whole memory, the
same arithmetic up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Block-sized ``s × B × D`` float32 tensors alive at once in :func:`attend_backward` (the memory block, its
#: gradient, and the copies the batched GEMMs make of them).
LIVE_BLOCKS = 4


@dataclass
class MemoryBlocks:
    """A window's attention memory, made block by block. ``src``/``keep``: source ids and real-token mask
    ``(S, B)``; ``embedding_weight``: the source embedding weight ``(V, E)`` (contexts with ``emb``) or None;
    ``stored``: the stored encoder units ``(S, B, D_s)`` or None; ``rows``: source positions per block."""

    src: Tensor
    keep: Tensor
    embedding_weight: Tensor | None
    stored: Tensor | None
    rows: int

    @classmethod
    def with_budget(
        cls, src: Tensor, keep: Tensor, embedding_weight: Tensor | None, stored: Tensor | None, block_bytes: int
    ) -> MemoryBlocks:
        """Blocks of as many source positions as keep :data:`LIVE_BLOCKS` block-sized float32 tensors within
        ``block_bytes`` (at least one position)."""
        width = (0 if embedding_weight is None else embedding_weight.shape[1]) + (
            0 if stored is None else stored.shape[2]
        )
        if width == 0:
            raise ValueError("AttentionHead has neither a source embedding nor stored encoder units to attend over.")
        per_position = LIVE_BLOCKS * src.shape[1] * width * 4
        return cls(src, keep, embedding_weight, stored, max(1, block_bytes // per_position))

    @property
    def embedding_size(self) -> int:
        """Feature columns of the memory that come from the embeddings (0 without them)."""
        return 0 if self.embedding_weight is None else self.embedding_weight.shape[1]

    def ranges(self) -> Iterator[slice]:
        """The blocks' source positions, in order."""
        S = self.src.shape[0]
        for s0 in range(0, S, self.rows):
            yield slice(s0, min(s0 + self.rows, S))

    def block(self, positions: slice) -> Tensor:
        """The memory ``(s, B, D)`` at ``positions``, before dropout, without a graph."""
        parts = []
        if self.embedding_weight is not None:
            parts.append(F.embedding(self.src[positions], self.embedding_weight.detach()))
        if self.stored is not None:
            parts.append(self.stored[positions].detach())
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


@torch.no_grad()
def attend(q: Tensor, memory: MemoryBlocks) -> tuple[Tensor, Tensor]:
    """Attention weights ``(C, B, S)`` and context ``(C, B, D)`` of queries ``q`` ``(C, B, D)`` over the memory
    (score ``q · m_s``, ``-inf`` at padded sources, softmax over ``s``)."""
    q = q.detach()
    scores = q.new_empty(q.shape[0], q.shape[1], memory.src.shape[0])
    for pos in memory.ranges():
        scores[..., pos] = torch.einsum("cbd,sbd->cbs", q, memory.block(pos))
    weights = scores.masked_fill_(~memory.keep.t()[None], float("-inf")).softmax(-1)
    context = torch.zeros_like(q)
    for pos in memory.ranges():
        context += torch.einsum("cbs,sbd->cbd", weights[..., pos], memory.block(pos))
    return weights, context


@torch.no_grad()
def attend_backward(
    q: Tensor,
    weights: Tensor,
    d_context: Tensor,
    memory: MemoryBlocks,
    embedding_grad: Tensor | None,
    stored_grad: Tensor | None,
) -> Tensor:
    """The gradient of the queries ``(C, B, D)`` given the context's ``d_context`` ``(C, B, D)`` (``q`` and
    ``weights`` as given to / returned by :func:`attend`). The memory's gradient is added block by block into
    ``embedding_grad`` ``(S, B, E)`` (the looked-up rows') and ``stored_grad`` ``(S, B, D_s)``; None: not wanted."""
    q, d_context = q.detach(), d_context.detach()
    d_weights = torch.empty_like(weights)
    for pos in memory.ranges():
        d_weights[..., pos] = torch.einsum("cbd,sbd->cbs", d_context, memory.block(pos))
    d_scores = weights * (d_weights - (weights * d_weights).sum(-1, keepdim=True))
    del d_weights
    d_q = torch.zeros_like(q)
    left, right = torch.cat([d_scores, weights]), torch.cat([q, d_context])  # d_m_s = Σ_c ds_cs q_c + a_cs dctx_c
    E = memory.embedding_size
    for pos in memory.ranges():
        d_q += torch.einsum("cbs,sbd->cbd", d_scores[..., pos], memory.block(pos))
        if embedding_grad is None and stored_grad is None:
            continue
        d_memory = torch.einsum("kbs,kbd->sbd", left[..., pos], right)
        if embedding_grad is not None:
            embedding_grad[pos] += d_memory[..., :E]
        if stored_grad is not None:
            stored_grad[pos] += d_memory[..., E:]
        del d_memory
    return d_q
