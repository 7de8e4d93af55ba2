"""A StepStem recomputes each step's input inside the reverse sweep (e.g. an embedding lookup)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_revrnn import RevGRU, RevLSTM, StepHead, StepStem
from lightning_revrnn.memory import saved_tensor_bytes


class Embed(StepStem):
    def __init__(self, vocab: int, dim: int, p: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.p = p
        self.mask: Tensor | None = None

    def sample(self, batch: int) -> None:
        self.mask = torch.bernoulli(torch.full((batch, self.emb.embedding_dim), 1 - self.p)) / (1 - self.p)

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.emb(inputs)
        return x if self.mask is None else x * self.mask


class Decode(StepHead):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, vocab)
        self.targets: Tensor | None = None

    def forward(self, output: Tensor, start: int) -> Tensor:
        assert self.targets is not None
        targets = self.targets[start : start + output.shape[0]]
        return nn.functional.cross_entropy(self.lin(output).flatten(0, 1), targets.flatten(), reduction="sum")


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
def test_stem_and_head_reverse_equals_store(cls: type) -> None:
    torch.manual_seed(0)
    V, E, H, T, B = 11, 6, 8, 25, 3
    stem, head = Embed(V, E, p=0.3), Decode(H, V)
    rnn = cls(E, [H, H], num_layers=2, dropout=0.2, dropconnect=0.3)
    tokens = torch.randint(0, V, (T, B))
    head.targets = torch.randint(0, V, (T, B))
    stem.sample(B)
    params = [*rnn.parameters(), *stem.parameters(), *head.parameters()]
    results = {}
    for mode in ("store", "reverse"):
        rnn.mode = mode
        torch.manual_seed(1)
        loss, h_n = rnn(tokens, head=head, stem=stem)
        results[mode] = (loss.detach(), h_n, torch.autograd.grad(loss, params))
    (ls, _hs, gs), (lr, _hr, gr) = results["store"], results["reverse"]
    assert torch.equal(ls, lr)
    for a, b in zip(gs, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert gr[len(list(rnn.parameters()))].abs().sum() > 0  # the embedding got a gradient


def test_stem_keeps_only_tokens_between_forward_and_backward() -> None:
    torch.manual_seed(0)
    V, E, H, B = 50, 32, 32, 4
    stem, head = Embed(V, E), Decode(H, V)
    rnn = RevGRU(E, H)
    sizes = []
    for T in (50, 200):
        tokens = torch.randint(0, V, (T, B))
        head.targets = torch.randint(0, V, (T, B))
        with saved_tensor_bytes([*rnn.parameters(), *stem.parameters(), *head.parameters()]) as saved:
            loss, _ = rnn(tokens, head=head, stem=stem)
        loss.backward()
        sizes.append(saved.total)
    per_step = (sizes[1] - sizes[0]) / 150
    # Per step: tokens (8·B) + checksum (8) + buffer (< 3 bits per unit-multiplication, in 32-bit planes)
    # + targets are the head's own; far below one float input row (4·B·E = 512 bytes).
    assert per_step < 4 * B * E / 4, per_step


def test_final_state_gradient_reaches_the_weights_with_a_stem() -> None:
    """Token ids are int64: the final-state gradient must stay float (a classifier on h_n)."""
    torch.manual_seed(0)
    stem, rnn = Embed(11, 8), RevGRU(8, 6)
    tokens = torch.randint(0, 11, (5, 3))
    grads = {}
    for mode in ("store", "reverse"):
        rnn.mode = mode
        _, h_n = rnn(tokens, stem=stem)
        grads[mode] = torch.autograd.grad((h_n * 0.37).sum(), [rnn.cell_list[0].weight_hh, stem.emb.weight])
    assert grads["reverse"][0].abs().max() > 0
    for a, b in zip(grads["store"], grads["reverse"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
