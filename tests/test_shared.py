"""The embedding stem shared by the language model and the translation model (:mod:`lightning_revrnn.shared`):
its weight's gradient in the reverse sweep is accumulated per looked-up row when the window has fewer tokens
than the vocabulary has words (so a translation encoder's sweep holds no ``V × E`` tensor beside the gradient
the decoder already gave the weight), and equals the store mode's either way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_revrnn import EmbeddingStem, RevGRU
from lightning_revrnn.core.rnn import Mode

E, B = 8, 3


def _step(vocab: int, steps: int, mode: Mode) -> list[torch.Tensor]:
    """One window of an untied embedding stem (word dropout on) into a RevGRU: the gradients of the embedding
    and the RNN."""
    torch.manual_seed(0)
    embedding = nn.Embedding(vocab, E)
    rnn = RevGRU(E, E, mode=mode, max_forget_bits=3)
    tokens = torch.randint(0, vocab, (steps, B))
    weights = torch.randn(steps, B, E)
    params = [embedding.weight, *rnn.parameters()]
    torch.manual_seed(1)
    out, _ = rnn(tokens, stem=EmbeddingStem(embedding, 0.2).bind(training=True))
    (out * weights).sum().backward()
    return [torch.zeros(0) if p.grad is None else p.grad for p in params]


@pytest.mark.parametrize(("vocab", "steps"), [(500, 20), (40, 20)], ids=["per-row", "dense"])
def test_reverse_embedding_gradient_equals_store(vocab: int, steps: int) -> None:
    """60 tokens from 500 words (per-row accumulator) and from 40 (a ``V × E`` one): the same gradients as
    autograd through the stored forward."""
    stem = EmbeddingStem(nn.Embedding(vocab, E), 0.0).bind(training=False)
    tokens = torch.zeros(steps, B, dtype=torch.long)
    per_row = stem.context_accumulator(stem.embedding.weight, tokens).shape == (steps, B, E)
    assert per_row == (vocab > steps * B)
    for got, want in zip(_step(vocab, steps, "reverse"), _step(vocab, steps, "store"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
