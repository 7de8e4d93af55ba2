"""Tensors a head or stem reads that are not its parameters: declared via ``context()`` they get the same
gradient in ``mode="reverse"`` as in ``mode="store"``; undeclared, forward raises instead of training silently
wrong (the reverse sweep would return no gradient for them)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from lightning_revrnn import RevGRU, RevLSTM, StepHead, StepStem


class AttentionHead(StepHead):
    """``softmax(out·memᵀ)·mem`` attention over a memory ``(S, B, H)``, then a decoder and cross-entropy."""

    def __init__(self, hidden: int, vocab: int, declare: bool = True) -> None:
        super().__init__()
        self.decoder = nn.Linear(2 * hidden, vocab)
        self.declare = declare
        self.memory: Tensor | None = None
        self.targets: Tensor | None = None

    def forward(self, output: Tensor, start: int) -> Tensor:
        assert self.memory is not None and self.targets is not None
        scores = torch.einsum("cbh,sbh->cbs", output, self.memory)
        attended = torch.einsum("cbs,sbh->cbh", scores.softmax(-1), self.memory)
        logits = self.decoder(torch.cat([output, attended], -1))
        targets = self.targets[start : start + output.shape[0]]
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")

    def context(self) -> Sequence[Tensor]:
        return [self.memory] if self.declare and self.memory is not None else []


class ConditionedStem(StepStem):
    """A linear map of the features plus a per-example conditioning vector read from outside ``(B, E)``."""

    def __init__(self, features: int, out: int, declare: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(features, out)
        self.declare = declare
        self.condition: Tensor | None = None

    def forward(self, inputs: Tensor) -> Tensor:
        assert self.condition is not None
        return torch.tanh(self.linear(inputs) + self.condition)

    def context(self) -> Sequence[Tensor]:
        return [self.condition] if self.declare and self.condition is not None else []


def close(a: Tensor | None, b: Tensor | None, what: str) -> None:
    """Reverse and store compute the same float32 gradient with a different association of the sums (per
    step instead of per chunk, one accumulator instead of autograd's): each sum of n ≤ T·B·H ≈ 10^3 terms
    differs by at most ~n·2^-24·Σ|terms| ≈ 6e-5 relative to the terms, so rtol 1e-4 with an absolute floor
    of 1e-5 of the largest gradient element (for elements that cancel to ~0)."""
    assert a is not None and b is not None, f"{what}: reverse {a is not None}, store {b is not None}"
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-12, msg=what)


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
@pytest.mark.parametrize("memory_kind", ["leaf", "encoder_output"])
def test_attention_head_context_gets_the_store_gradient(cls: type, memory_kind: str) -> None:
    torch.manual_seed(0)
    T, B, S, F, H, V = 21, 3, 5, 4, 8, 7
    rnn = cls(F, [H, H], num_layers=2, dropout=0.2, dropconnect=0.3)
    head = AttentionHead(H, V)
    head.targets = torch.randint(0, V, (T, B))
    x = torch.randn(T, B, F, requires_grad=True)
    source = torch.randn(S, B, F, requires_grad=True)
    encoder = nn.Linear(F, H)
    memory = torch.randn(S, B, H, requires_grad=True)
    outside = [memory] if memory_kind == "leaf" else [source, *encoder.parameters()]
    tensors = [x, *rnn.parameters(), *head.parameters(), *outside]
    results = {}
    for mode in ("store", "reverse"):
        rnn.mode = mode
        head.memory = memory if memory_kind == "leaf" else encoder(source)
        torch.manual_seed(1)
        loss, _ = rnn(x, head=head)
        results[mode] = (loss.detach(), torch.autograd.grad(loss, tensors, allow_unused=True))
    (ls, gs), (lr, gr) = results["store"], results["reverse"]
    assert torch.equal(ls, lr)
    names = ["x", *(n for n, _ in rnn.named_parameters()), *(f"head.{n}" for n, _ in head.named_parameters())]
    names += ["memory"] if memory_kind == "leaf" else ["source", "encoder.weight", "encoder.bias"]
    for name, a, b in zip(names, gr, gs, strict=True):
        close(a, b, name)
    assert float(gr[-1].abs().sum()) > 0  # the outside tensor really gets a gradient


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM])
def test_stem_context_and_input_get_the_store_gradient(cls: type) -> None:
    torch.manual_seed(2)
    T, B, F, E, H = 19, 3, 5, 6, 8
    rnn = cls(E, H, input_dropout=0.2)
    stem = ConditionedStem(F, E)
    x = torch.randn(T, B, F, requires_grad=True)  # the stem's input itself needs a gradient too
    condition = torch.randn(B, E, requires_grad=True)
    results = {}
    for mode in ("store", "reverse"):
        rnn.mode = mode
        stem.condition = condition * 1.5  # a non-leaf: the output of another computation
        torch.manual_seed(3)
        out, h_n = rnn(x, stem=stem)
        loss = (out**2).sum() + (torch.stack(list(h_n)) if isinstance(h_n, tuple) else h_n).sum()
        tensors = [x, condition, *rnn.parameters(), *stem.parameters()]
        results[mode] = torch.autograd.grad(loss, tensors, allow_unused=True)
    for i, (a, b) in enumerate(zip(results["reverse"], results["store"], strict=True)):
        close(a, b, f"tensor {i}")
    assert float(results["reverse"][1].abs().sum()) > 0


def test_undeclared_head_input_raises() -> None:
    torch.manual_seed(4)
    rnn = RevGRU(3, 6)
    head = AttentionHead(6, 5, declare=False)
    head.targets = torch.randint(0, 5, (7, 2))
    head.memory = nn.Linear(3, 6)(torch.randn(4, 2, 3))  # an encoder output, not declared
    x = torch.randn(7, 2, 3)
    expected = r"StepHead AttentionHead reads a tensor .*context\(\) \(its graph reaches a leaf of shape \(6, 3\)"
    with pytest.raises(RuntimeError, match=expected):
        rnn(x, head=head)
    # Store mode is ordinary autograd: the same head is fine there.
    rnn.mode = "store"
    loss, _ = rnn(x, head=head)
    loss.backward()
    # Undeclared but not requiring grad (or detached): nothing to lose, no error.
    rnn.mode = "reverse"
    head.memory = head.memory.detach()
    loss, _ = rnn(x, head=head)
    loss.backward()


def test_undeclared_stem_input_raises() -> None:
    rnn = RevLSTM(4, 6)
    stem = ConditionedStem(3, 4, declare=False)
    stem.condition = torch.randn(2, 4, requires_grad=True)
    expected = r"StepStem ConditionedStem reads a tensor .*leaf of shape \(2, 4\).*Fix: return that tensor"
    with pytest.raises(RuntimeError, match=expected):
        rnn(torch.randn(5, 2, 3), stem=stem)


def test_parameter_of_another_module_is_undeclared() -> None:
    """A head reading a parameter it does not own (not a submodule's) would get no gradient either."""
    shared = nn.Parameter(torch.randn(6, 6))

    class Projector(StepHead):
        def forward(self, output: Tensor, start: int) -> Tensor:
            return (output @ shared).sum()

    rnn = RevGRU(3, 6)
    with pytest.raises(RuntimeError, match=r"shape \(6, 6\)"):
        rnn(torch.randn(4, 2, 3, requires_grad=True), head=Projector())
    # Declared, it gets the store gradient.
    Projector.context = lambda self: [shared]  # type: ignore[method-assign]
    x = torch.randn(4, 2, 3)
    grads = {}
    for mode in ("store", "reverse"):
        rnn.mode = mode
        loss, _ = rnn(x, head=Projector())
        grads[mode] = torch.autograd.grad(loss, [shared, *rnn.parameters()])
    for a, b in zip(grads["reverse"], grads["store"], strict=True):
        close(a, b, "shared")


def test_head_parameter_that_feeds_its_context_raises_with_the_fix() -> None:
    """A head parameter that is also an ancestor of a context tensor (an embedding shared by the head and
    the encoder behind the memory) would make the per-chunk head gradient run the encoder's backward again."""
    torch.manual_seed(0)
    T, B, S, H, V = 5, 2, 3, 8, 7
    shared = nn.Embedding(V, H)

    class SharedHead(StepHead):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = shared
            self.memory: Tensor | None = None

        def forward(self, output: Tensor, start: int) -> Tensor:
            assert self.memory is not None  # set below, before the encoder runs
            return (output * self.memory.mean(0)).sum() + self.embedding.weight.sum()

        def context(self) -> list[Tensor]:
            assert self.memory is not None
            return [self.memory]

    head = SharedHead()
    encoder = RevGRU(H, H)
    head.memory, _ = encoder(shared(torch.randint(0, V, (S, B))))
    with pytest.raises(RuntimeError, match="also feeds one of its context\\(\\) tensors"):
        RevGRU(4, H)(torch.randn(T, B, 4, requires_grad=True), head=head)
