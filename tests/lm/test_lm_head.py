"""The language model's decoder head: blockwise (reversible models) equals plain, and the step's peak follows
the byte budget instead of ``chunk × batch × vocab`` logits and a ``vocab × emb`` gradient per chunk."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_revrnn import DecoderHead, EmbeddingStem, RevGRU
from lightning_revrnn.core.protocol import CHUNK
from lightning_revrnn.core.rnn import Mode
from lightning_revrnn.memory import MemoryTrace

V, E, T, B = 3000, 16, 40, 6


def _step(block_bytes: int | None, mode: Mode = "reverse", trace: bool = False) -> tuple[torch.Tensor, list, int]:
    """One LM window (tied embedding/decoder, dropout on): the summed loss, the gradients, the step's peak bytes
    without parameter gradients."""
    torch.manual_seed(0)
    embedding = nn.Embedding(V, E)
    decoder = nn.Linear(E, V)
    decoder.weight = embedding.weight
    rnn = RevGRU(E, E, mode=mode)
    stem, head = EmbeddingStem(embedding, 0.1), DecoderHead(decoder, 0.3, block_bytes=block_bytes)
    tokens, targets = torch.randint(0, V, (T, B)), torch.randint(0, V, (T, B))
    targets[3:7, 2] = -100
    params = [*rnn.parameters(), embedding.weight, decoder.bias]
    tracer = MemoryTrace(torch.device("cpu"))
    if trace:
        tracer.start()
    torch.manual_seed(1)
    bound_stem = stem.bind(training=True)
    bound_head = head.bind(targets, training=True)
    loss, _ = rnn(tokens, head=bound_head, stem=bound_stem)
    loss.backward()
    peak = tracer.stop(params).peak_excl_grad_bytes if trace else 0
    return loss.detach(), [p.grad for p in params], peak


@pytest.mark.parametrize("mode", ["reverse", "store"])
def test_blockwise_head_equals_the_plain_head(mode: Mode) -> None:
    plain_loss, plain_grads, _ = _step(None, mode)
    loss, grads, _ = _step(64 * 2**10, mode)  # 64 KiB: 5 float32 rows of the 3000-word vocabulary per block
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_step_peak_follows_the_budget_not_the_logits() -> None:
    _, _, plain = _step(None, trace=True)
    _, _, blockwise = _step(64 * 2**10, trace=True)
    chunk_logits = CHUNK * B * V * 4  # one chunk's float32 logits: what the plain head allocates (several times)
    assert plain - blockwise > chunk_logits, (plain, blockwise)
