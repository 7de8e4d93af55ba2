"""The blockwise generator + cross-entropy and the blockwise attention of the reversible decoder's head: the
same values and gradients as the plain ops (ignored rows, blocks that do not divide the rows or sources), and
memory bounded by the byte budget instead of rows × vocabulary."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_revrnn.chunked_loss import (
    linear_cross_entropy,
    linear_cross_entropy_accumulate,
    live_blocks,
    rows_per_block,
)
from lightning_revrnn.memory import MemoryTrace
from lightning_revrnn.translation.attention_blocks import MemoryBlocks, attend, attend_backward

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from seq2seq_helpers import padded_batch, tiny_model

IGNORE = -100
N, H, V = 10, 6, 23
#: 3 float32 rows per block: 10 rows give blocks of 3, 3, 3, 1.
THREE_ROWS = 3 * V * 4


def _close(got: Tensor, want: Tensor) -> None:
    """float32 sums over at most V terms, associated per block instead of at once."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _inputs(bias: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[1, 4, 9]] = IGNORE  # padding, as the head marks it
    return x, w, b, targets


def test_rows_per_block_follows_the_budget() -> None:
    assert rows_per_block(V, THREE_ROWS) == 3  # float32: the logits are the block's one rows × V tensor
    assert rows_per_block(V, 2 * THREE_ROWS, live=2) == 3
    assert live_blocks("cpu") == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert live_blocks("cpu") == 2  # the bf16 GEMM output and its float32 copy
    assert rows_per_block(V, 1) == 1  # below one row: one-row blocks
    with pytest.raises(ValueError, match="block_bytes must be positive"):
        rows_per_block(V, 0)


@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_equal_cross_entropy(bias: bool) -> None:
    x, w, b, targets = _inputs(bias)
    params = [t for t in (x, w, b) if t is not None]
    want = F.cross_entropy(F.linear(x, w, b), targets, ignore_index=IGNORE, reduction="sum")
    want_grads = torch.autograd.grad(want * 0.37, params)
    got = linear_cross_entropy(x, w, b, targets, IGNORE, THREE_ROWS)
    got_grads = torch.autograd.grad(got * 0.37, params)
    _close(got, want)
    for g, w_ in zip(got_grads, want_grads):
        _close(g, w_)
    assert float(got_grads[0][[1, 4, 9]].abs().sum()) == 0.0  # ignored rows get no gradient
    with torch.no_grad():  # the value-only path (the sweep's forward, evaluation)
        _close(linear_cross_entropy(x, w, b, targets, IGNORE, THREE_ROWS), want)


def test_accumulate_adds_scaled_gradients_into_the_callers_buffers() -> None:
    x, w, b, targets = _inputs()
    want = F.cross_entropy(F.linear(x, w, b), targets, ignore_index=IGNORE, reduction="sum")
    assert b is not None
    dx, dw, db = torch.autograd.grad(want, [x, w, b])
    w_acc, b_acc = torch.ones(V, H), torch.ones(V)  # earlier chunks' gradients: added to, not overwritten
    loss, got_dx = linear_cross_entropy_accumulate(x, w, b, targets, 0.5, w_acc, b_acc, IGNORE, THREE_ROWS)
    _close(loss, want.detach())
    _close(got_dx, 0.5 * dx)
    _close(w_acc, 1 + 0.5 * dw)
    _close(b_acc, 1 + 0.5 * db)


def test_bad_shapes_name_the_fix() -> None:
    x, w, b, targets = _inputs()
    with pytest.raises(ValueError, match=r"flatten the leading dimensions"):
        linear_cross_entropy(x[None], w, b, targets)
    with pytest.raises(ValueError, match=r"targets must be \(N,\)"):
        linear_cross_entropy(x, w, b, targets[:3])


def test_loss_memory_is_bounded_by_the_budget_not_rows_times_vocab() -> None:
    """Forward and backward together allocate at most the budget beyond the gradients themselves; the plain
    loss's logits alone (N × V float32) are over 15 times the budget."""
    n, h, v, budget = 512, 8, 4000, 512 * 1024
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    b = torch.zeros(v, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    trace = MemoryTrace(torch.device("cpu"))
    trace.start()
    trace.begin_forward()
    loss = linear_cross_entropy(x, w, b, targets, IGNORE, budget)
    trace.end_forward()
    loss.backward()
    measured = trace.stop([x, w, b])
    logits_bytes = n * v * 4
    assert logits_bytes >= 15 * budget
    assert measured.saved_bytes <= n * 4 + 1024  # each row's log-sum-exp, no logits
    assert measured.peak_excl_grad_bytes <= budget + 64 * 1024, measured


def _attention_reference(q: Tensor, emb_weight: Tensor, stored: Tensor, src: Tensor, keep: Tensor) -> Tensor:
    memory = torch.cat([F.embedding(src, emb_weight), stored], -1)
    scores = torch.einsum("cbd,sbd->cbs", q, memory).masked_fill(~keep.t()[None], float("-inf"))
    return torch.einsum("cbs,sbd->cbd", scores.softmax(-1), memory)


def test_blockwise_attention_equals_autograd_over_the_whole_memory() -> None:
    """Blocks of 2 source positions over 5 (the last one short), padded sources, both memory parts."""
    g = torch.Generator().manual_seed(0)
    C, B, S, E, Ds, Vs = 3, 4, 5, 6, 2, 9
    lengths = torch.tensor([5, 1, 3, 4])
    keep = torch.arange(S)[:, None] < lengths[None]
    src = torch.randint(0, Vs, (S, B), generator=g).masked_fill(~keep, 0)
    q = torch.randn(C, B, E + Ds, generator=g, requires_grad=True)
    emb_weight = torch.randn(Vs, E, generator=g, requires_grad=True)
    stored = torch.randn(S, B, Ds, generator=g, requires_grad=True)
    d_context = torch.randn(C, B, E + Ds, generator=g)
    want = _attention_reference(q, emb_weight, stored, src, keep)
    want_grads = torch.autograd.grad(want, [q, emb_weight, stored], d_context)
    memory = MemoryBlocks(src, keep, emb_weight, stored, rows=2)
    weights, context = attend(q, memory)
    _close(context, want.detach())
    emb_rows, stored_acc = torch.zeros(S, B, E), torch.zeros(S, B, Ds)  # the looked-up rows' gradients
    d_q = attend_backward(q, weights, d_context, memory, emb_rows, stored_acc)
    emb_acc = torch.zeros(Vs, E).index_add_(0, src.flatten(), emb_rows.flatten(0, 1))
    for got, ref in zip((d_q, emb_acc, stored_acc), want_grads):
        _close(got, ref)
    assert float(stored_acc[~keep].abs().sum()) == 0.0  # padded sources get no gradient
    assert float(emb_rows[~keep].abs().sum()) == 0.0


def test_reversible_step_peak_is_bounded_by_the_budget_not_chunk_batch_vocab() -> None:
    """A whole reverse-mode training step of a model with a large target vocabulary: its activation peak
    stays below one chunk's logits (C × B × V float32), which the old head held three of at once."""
    vocab, budget = 6000, 64 * 1024
    model = tiny_model(
        "revgru",
        vocab=None,
        src_vocab_size=40,
        tgt_vocab_size=vocab,
        context="emb+slice",
        dropout=0.3,
        head_block_bytes=budget,
    ).train()
    batch = padded_batch([6, 3, 5, 6, 2, 4, 6, 1], [15, 9, 15, 3, 12, 15, 7, 15], 40)  # T = 16: two full chunks
    chunk_logits = batch.tgt_out.numel() * vocab * 4
    trace = MemoryTrace(torch.device("cpu"))
    model.summed_loss(batch).backward()  # warm-up (allocator, lazy init)
    model.zero_grad(set_to_none=True)
    trace.start()
    trace.begin_forward()
    loss = model.summed_loss(batch)
    trace.end_forward()
    loss.backward()
    measured = trace.stop(model.parameters())
    assert measured.peak_excl_grad_bytes < chunk_logits, (measured, chunk_logits)
    assert float(model.head.generator.weight.grad.abs().sum()) > 0
