"""Luong "general" attention and the translation output layer, run a chunk of target steps at a time.

:class:`LuongAttention` maps decoder states ``h`` ``(C, B, H)`` and an attention memory ``(S, B, D)`` to the
attentional output ``tanh(W_c [context; h])`` ``(C, B, H)``: score ``hᵀ W_a s`` (``W_a`` maps ``h`` to the
memory's size ``D``, so the memory itself is never projected), source padding masked in the softmax, no
input feeding (spec section 5).

:class:`AttentionHead` holds the output layer of a decoder: attention, output dropout, the generator (``Linear``
to the target vocabulary) and the cross-entropy summed over the real target tokens of a chunk, so no
``T × B × vocab`` logits tensor ever exists. :meth:`AttentionHead.bind` binds it to one window and returns a
:class:`BoundAttentionHead`, the :class:`~lightning_revrnn.core.protocol.StepHead` the decoder runs. It builds the
memory from

* the stored encoder units (``slice``: the first ``slice_dim`` units of the encoder's top ``h1``;
  ``hidden``: the whole top state), a tensor declared in :meth:`BoundAttentionHead.context` so the decoder's
  reverse sweep returns its gradient to the encoder, and/or
* the source word embeddings (``emb``), recomputed from the source tokens inside every call, so nothing of
  size ``S × B × E`` lives from forward to backward. The head reads the source embedding weight through an
  alias (a view made in :meth:`AttentionHead.bind`, declared in :meth:`BoundAttentionHead.context`), not as
  its own parameter: the encoder's sweep reads the same weight, and a head *parameter* that the stored
  units' history also reaches would make the decoder sweep's per-chunk ``autograd.grad`` run the
  encoder's backward inside the decoder's (the reverse sweep supports one backward per forward). Through a
  view, the weight gets the same gradient and no path from the head's targets leads into the encoder.

The alias is a :class:`SparseGradAlias` and the lookup uses ``sparse=True``, so the per-chunk gradient of the
weight is the looked-up rows, not a dense ``V × E`` tensor.

Memory of a reversible head (``block_bytes`` set): the generator and cross-entropy run a block of rows at a
time (:func:`~lightning_revrnn.chunked_loss.linear_cross_entropy`), and in the reverse sweep
(:meth:`BoundAttentionHead.accumulate_grads`) and the sweep's forward the attention runs a block of source
positions at a time (:mod:`lightning_revrnn.translation.attention_blocks`), with the generator's, the embedding's
and the stored units' gradients added straight into the sweep's accumulators. So the head's working set is bounded by
``block_bytes`` (plus ``C × B × S`` attention weights and ``C × B × (H + D)`` activations), not by
``C × B × vocab`` or ``S × B × D``. ``mode="store"`` (the gradient reference) differentiates the same head with
autograd over the whole memory: the same arithmetic up to rounding (the loss agrees with ``mode="reverse"`` to
float tolerance; bit for bit only where the source fits one block).

The baselines (``nn.GRU``/``nn.LSTM`` decoders, ``block_bytes=None``) call the same head on their outputs chunk
by chunk in plain autograd (:meth:`BoundAttentionHead.chunked`), with the plain ``nn.Linear`` + ``F.cross_entropy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_revrnn.chunked_loss import DEFAULT_BLOCK_BYTES, linear_cross_entropy, linear_cross_entropy_into
from lightning_revrnn.core.dropout import locked_mask
from lightning_revrnn.core.protocol import StepHead, add_gradients, lookup_gradient
from lightning_revrnn.translation.attention_blocks import MemoryBlocks, attend, attend_backward

#: Target positions the loss ignores (``F.cross_entropy``'s ``ignore_index``).
IGNORE = -100
#: Target steps the baselines' head runs at once (:meth:`BoundAttentionHead.chunked`): 8, as since the reversible
#: sweep's chunks were 8 steps long, so the baselines' figures stay comparable across versions.
BASELINE_CHUNK = 8


class LuongAttention(nn.Module):
    """Luong "general" attention with the attentional output layer ``tanh(W_c [context; h])``.

    Args:
        hidden_size: the decoder state's size ``H`` (also the output's).
        memory_size: the memory's feature size ``D`` (``W_a``: ``H → D``; ``W_c``: ``D + H → H``).
    """

    def __init__(self, hidden_size: int, memory_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, memory_size, bias=False)  # W_a
        self.output = nn.Linear(memory_size + hidden_size, hidden_size, bias=False)  # W_c

    @override
    def forward(self, h: Tensor, memory: Tensor, memory_keep: Tensor) -> Tensor:
        """The attentional output ``(C, B, H)`` of states ``h`` ``(C, B, H)`` over ``memory`` ``(S, B, D)``,
        attending only where ``memory_keep`` ``(S, B)`` is True (every column needs one True entry)."""
        context = torch.einsum("cbs,sbd->cbd", self.weights(h, memory, memory_keep), memory)
        return torch.tanh(self.output(torch.cat([context, h], -1)))

    def weights(self, h: Tensor, memory: Tensor, memory_keep: Tensor) -> Tensor:
        """The attention weights ``(C, B, S)`` of states ``h`` ``(C, B, H)`` over the memory's positions
        (softmax of ``hᵀ W_a s``, 0 where ``memory_keep`` is False)."""
        scores = torch.einsum("cbd,sbd->cbs", self.query(h), memory)
        return scores.masked_fill(~memory_keep.t()[None], float("-inf")).softmax(-1)


class AttentionHead(nn.Module):
    """Attention, output dropout, generator and summed cross-entropy of a chunk of decoder steps.

    Args:
        attention: the :class:`LuongAttention` layer (its ``memory_size`` = embedding size if
            ``src_embedding`` is given, plus the stored units' size).
        generator: ``Linear(H, target vocabulary)``.
        src_embedding: the source embedding module when the memory includes the source embeddings
            (contexts ``emb`` and ``emb+slice``), else None. Not registered as a submodule (its owner
            trains it; see the module docstring).
        dropout: dropout on the attentional output and on the memory (one mask per window, locked over time).
        block_bytes: generator and cross-entropy by :func:`~lightning_revrnn.chunked_loss.linear_cross_entropy`
            with this byte budget for its row-block temporaries (the reversible decoder: the head's memory is
            then bounded by the budget, not by ``chunk × batch × vocab``); None: the plain
            ``F.cross_entropy(generator(·))`` (the baselines: what a user would write).

    It holds no per-batch state: :meth:`bind` takes one window's memory sources and targets, draws its dropout
    masks and returns the :class:`BoundAttentionHead` (a :class:`~lightning_revrnn.core.protocol.StepHead`) that
    reads them, which is what the decoder runs (and, with a reversible decoder, runs again in its reverse
    sweep). The bound head shares this head's attention and generator (the same parameters); it lives as long
    as the window's graph, so nothing needs releasing after backward. Decoding reads no window: it builds the
    memory once (:meth:`build_memory`) and steps :meth:`log_probs`.

    Example::

        head = AttentionHead(LuongAttention(H, E + D_s), nn.Linear(H, V_tgt), src_embedding, dropout=0.4)
        stored, h_n = encode(src, src_keep)  # the stored encoder units (S, B, D_s), with their graph
        bound = head.bind(stored, src, src_keep, tgt_out, tgt_keep, training=True)
        loss_sum, _ = decoder(tgt_in, h_n, head=bound, stem=tgt_stem.bind(training=True), keep=tgt_keep)
        loss_sum.backward()  # the bound head goes with the graph
    """

    def __init__(
        self,
        attention: LuongAttention,
        generator: nn.Linear,
        src_embedding: nn.Embedding | None,
        dropout: float,
        block_bytes: int | None = DEFAULT_BLOCK_BYTES,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.generator = generator
        self._src_embedding = (src_embedding,)  # a tuple: not a registered submodule
        self.dropout = dropout
        self.block_bytes = block_bytes

    def bind(
        self, stored: Tensor | None, src: Tensor, src_keep: Tensor, tgt_out: Tensor, tgt_keep: Tensor, training: bool
    ) -> BoundAttentionHead:
        """The head of one window: its memory sources, targets and dropout masks.

        ``stored``: the stored encoder units ``(S, B, D_s)`` (with their graph to the encoder) or None;
        ``src``/``src_keep``: source ids and padding mask ``(S, B)``; ``tgt_out``/``tgt_keep``: the targets
        and real-token mask ``(T, B)``. Masks are drawn now from the global RNG, the memory's then the
        output's (none in evaluation).
        """
        embedding = self._src_embedding[0]
        embedding_weight = None if embedding is None else SparseGradAlias.apply(embedding.weight)  # type: ignore[no-untyped-call]  # Function.apply is unannotated
        targets = tgt_out.masked_fill(~tgt_keep, IGNORE)
        hidden = self.attention.output.out_features
        memory_size = self.attention.query.out_features
        batch = src.shape[1]
        like = self.generator.weight
        memory_mask = locked_mask((batch, memory_size), self.dropout, like) if training else None
        output_mask = locked_mask((batch, hidden), self.dropout, like) if training else None
        return BoundAttentionHead(self, stored, src, src_keep, embedding_weight, targets, memory_mask, output_mask)

    def build_memory(self, src: Tensor, stored: Tensor | None, embedding_weight: Tensor | None = None) -> Tensor:
        """The memory ``(S, B, D)`` before dropout: the embeddings of ``src`` ``(S, B)`` (contexts with
        ``emb``; looked up in ``embedding_weight``, default the source embedding's weight) and the stored
        units ``(S, B, D_s)`` (contexts with a slice or the hidden state), concatenated."""
        embedding = self._src_embedding[0]
        parts = []
        if embedding is not None:  # through the alias (training) the weight's gradient is sparse: rows, not V × E
            weight = embedding.weight if embedding_weight is None else embedding_weight
            parts.append(F.embedding(src, weight, sparse=embedding_weight is not None))
        if stored is not None:
            parts.append(stored)
        if not parts:
            raise ValueError("AttentionHead has neither a source embedding nor stored encoder units to attend over.")
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def log_probs(self, output: Tensor, memory: Tensor, memory_keep: Tensor) -> Tensor:
        """Next-token log-probabilities ``(..., B, V)`` of decoder outputs ``(C, B, H)`` over a prepared
        ``memory`` (decoding: no dropout, the memory built once by :meth:`build_memory`)."""
        logits: Tensor = self.generator(self.attention(output, memory, memory_keep))
        return logits.float().log_softmax(-1)


class BoundAttentionHead(StepHead):
    """:class:`AttentionHead` bound to one window (made by :meth:`AttentionHead.bind`): the stored units
    ``(S, B, D_s)`` or None, the source ids and padding mask ``(S, B)``, the source embedding weight's alias or
    None, the targets ``(T, B)`` (padding set to ``IGNORE``) and the memory and output dropout masks ``(B, D)``,
    ``(B, H)`` (None: no dropout). Its attention and generator are the unbound head's (same parameters)."""

    def __init__(
        self,
        head: AttentionHead,
        stored: Tensor | None,
        src: Tensor,
        src_keep: Tensor,
        embedding_weight: Tensor | None,
        targets: Tensor,
        memory_mask: Tensor | None,
        output_mask: Tensor | None,
    ) -> None:
        super().__init__()
        self.attention = head.attention
        self.generator = head.generator
        self._head = (head,)  # a tuple: not a registered submodule (its parameters are the two above)
        self.block_bytes = head.block_bytes
        self.stored, self.src, self.src_keep, self.embedding_weight = stored, src, src_keep, embedding_weight
        self.targets, self.memory_mask, self.output_mask = targets, memory_mask, output_mask

    def memory(self) -> Tensor:
        """The attention memory ``(S, B, D)`` of this window (embeddings recomputed now), after memory dropout."""
        memory = self._head[0].build_memory(self.src, self.stored, self.embedding_weight)
        return memory if self.memory_mask is None else memory * self.memory_mask

    def attentional(self, output: Tensor) -> Tensor:
        """The attentional output ``(C, B, H)`` of decoder outputs ``(C, B, H)``, after output dropout."""
        out: Tensor = self.attention(output, self.memory(), self.src_keep)
        return out if self.output_mask is None else out * self.output_mask

    def memory_blocks(self) -> MemoryBlocks:
        """This window's memory as blocks of source positions within ``block_bytes`` (reversible heads)."""
        assert self.block_bytes is not None
        return MemoryBlocks.with_budget(self.src, self.src_keep, self.embedding_weight, self.stored, self.block_bytes)

    def masked_query(self, output: Tensor) -> Tensor:
        """``W_a h`` ``(C, B, D)`` times the memory's dropout mask (so the memory itself is never masked)."""
        query: Tensor = self.attention.query(output)
        return query if self.memory_mask is None else query * self.memory_mask

    def output_layer(self, context: Tensor, output: Tensor) -> Tensor:
        """``tanh(W_c [context; h])`` after output dropout, from the raw context (the memory mask applied here)."""
        if self.memory_mask is not None:
            context = context * self.memory_mask
        out = torch.tanh(self.attention.output(torch.cat([context, output], -1)))
        return out if self.output_mask is None else out * self.output_mask

    @override
    def forward(self, output: Tensor, start: int) -> Tensor:
        targets = self.targets[start : start + output.shape[0]].flatten()
        if self.block_bytes is not None and not torch.is_grad_enabled():  # the sweep's forward, evaluation
            _, context = attend(self.masked_query(output), self.memory_blocks())
            attentional = self.output_layer(context, output).flatten(0, 1)
        else:
            attentional = self.attentional(output).flatten(0, 1)
        if self.block_bytes is None:
            logits = self.generator(attentional)
            return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
        generator = self.generator
        return linear_cross_entropy(attentional, generator.weight, generator.bias, targets, IGNORE, self.block_bytes)

    @override
    def accumulate_grads(
        self, output: Tensor, start: int, d_value: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> Tensor | None:
        """Reverse sweep (:func:`~lightning_revrnn.core.sweep.head_gradient`): the gradient of ``forward(output,
        start) · d_value`` with respect to ``output`` (a leaf requiring grad), adding the gradient of every
        ``(tensor, accumulator)`` target into its accumulator. The generator's weight and bias gradients go
        straight into theirs, block of rows by block
        (:func:`~lightning_revrnn.chunked_loss.linear_cross_entropy_into`), so neither a ``C × B × vocab``
        logits tensor nor a per-chunk ``vocab × H`` gradient exists; attention, dropout and the context get theirs
        from autograd, as before."""
        if self.block_bytes is None:  # the plain head: autograd for everything
            return super().accumulate_grads(output, start, d_value, targets)
        flat_targets = self.targets[start : start + output.shape[0]].flatten()
        memory = self.memory_blocks()
        query = self.masked_query(output)  # graph: output, W_a
        weights, context = attend(query, memory)
        context.requires_grad_()  # a leaf: the attention core's backward is written out below
        attentional = self.output_layer(context, output).flatten(0, 1)  # graph: context, output, W_c
        generator, own = self.generator, {id(t): acc for t, acc in targets}
        d_attentional = linear_cross_entropy_into(
            attentional, generator, flat_targets, d_value, targets, IGNORE, self.block_bytes
        )
        (d_context,) = torch.autograd.grad(attentional, [context], d_attentional, retain_graph=True)
        embedding_acc = None if self.embedding_weight is None else own.get(id(self.embedding_weight))
        stored_acc = None if self.stored is None else own.get(id(self.stored))
        d_query = attend_backward(query, weights, d_context, memory, embedding_acc, stored_acc)
        skip = {id(generator.weight), id(generator.bias), id(self.embedding_weight), id(self.stored)}
        rest = [(t, acc) for t, acc in targets if id(t) not in skip]
        grads = torch.autograd.grad(
            [attentional, query],
            [output, *[t for t, _ in rest]],
            [d_attentional, d_query.to(query.dtype)],
            allow_unused=True,
        )
        add_gradients(rest, grads[1:])
        return grads[0]

    @override
    def context(self) -> Sequence[Tensor]:
        """The stored encoder units and the source embedding weight's alias: the reverse sweep returns their
        gradients (the units' into the encoder's sweep)."""
        return [t for t in (self.stored, self.embedding_weight) if t is not None]

    def _compact(self, tensor: Tensor) -> bool:
        """Whether the sweep accumulates ``tensor``'s gradient by looked-up row: the embedding alias, blockwise."""
        return tensor is self.embedding_weight and self.block_bytes is not None

    @override
    def context_accumulator(self, tensor: Tensor) -> Tensor:
        """The embedding alias's gradient is accumulated per looked-up row, ``(S, B, E)``, not as a ``V × E``
        tensor through the whole sweep; the rest as by default."""
        if self._compact(tensor):
            return tensor.new_zeros((*self.src.shape, tensor.shape[1]))
        return super().context_accumulator(tensor)

    @override
    def context_gradient(self, tensor: Tensor, accumulator: Tensor) -> Tensor:
        """The embedding alias's ``V × E`` gradient from its rows, built once the sweep is done."""
        if self._compact(tensor):
            return lookup_gradient(tensor, self.src, accumulator)
        return accumulator

    def chunked(self, outputs: Tensor) -> Tensor:
        """The head's sum over all steps of decoder outputs ``(T, B, H)``, computed :data:`BASELINE_CHUNK` steps
        at a time in plain autograd (the baselines: at most ``BASELINE_CHUNK × B × vocab`` logits at once in
        forward; autograd still keeps each chunk's for backward)."""
        steps = BASELINE_CHUNK
        return torch.stack([self(outputs[t : t + steps], t) for t in range(0, outputs.shape[0], steps)]).sum()


class SparseGradAlias(torch.autograd.Function):
    """``apply(weight)``: a view of ``weight`` whose backward passes a sparse gradient on as a dense one.

    The head reads the source embedding weight through this alias (see the module docstring) with
    ``F.embedding(..., sparse=True)``: the gradient of the alias is then the looked-up rows (``S × B × E``),
    which the reverse sweep adds into its accumulator, instead of a dense ``V × E`` tensor per chunk. A plain
    ``view_as`` cannot carry it back to the weight (its backward reshapes, which sparse tensors do not
    support); this one densifies it there (``mode="store"``: once, after autograd summed every chunk's rows).
    """

    @staticmethod
    def forward(ctx: object, weight: Tensor) -> Tensor:
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.to_dense() if grad.is_sparse else grad
