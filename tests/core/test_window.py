"""The window plan: frozen, its extras collected once (a tied weight is one entry), unchanged by a forward and
its reverse sweep."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor, nn

from lightning_revrnn import RevGRU, StepHead, StepStem
from lightning_revrnn.core.window import state_checksum


class TiedStem(StepStem):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, inputs: Tensor) -> Tensor:
        return self.embedding(inputs)


class TiedHead(StepHead):
    def __init__(self, decoder: nn.Linear, targets: Tensor) -> None:
        super().__init__()
        self.decoder, self.targets = decoder, targets

    def forward(self, output: Tensor, start: int) -> Tensor:
        logits = self.decoder(output)
        targets = self.targets[start : start + len(output)]
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def test_the_plan_is_frozen_and_survives_its_window_unchanged() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(11, 4)
    decoder = nn.Linear(4, 11)
    decoder.weight = embedding.weight  # tied
    rnn = RevGRU(4, 4, dropout=0.0, dropconnect=0.3)
    tokens, targets = torch.randint(0, 11, (20, 3)), torch.randint(0, 11, (20, 3))
    loss, _ = rnn(tokens, head=TiedHead(decoder, targets), stem=TiedStem(embedding))
    record = rnn.last_window
    assert record is not None
    plan = record.plan
    snapshot = tuple(getattr(plan, f.name) for f in dataclasses.fields(plan))
    assert len(plan.extras) == 2  # the tied weight once, the decoder bias
    assert plan.extras[0] is embedding.weight
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.retain = False  # type: ignore[misc]
    loss.backward()
    assert all(a is b for a, b in zip(snapshot, (getattr(plan, f.name) for f in dataclasses.fields(plan))))
    assert all(buf.is_empty() for buf in record.buffers)


def test_state_checksum_sees_a_single_bit() -> None:
    state = [torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)]
    flipped = [state[0].clone(), state[1].clone()]
    flipped[1][1, 2] = 1
    assert state_checksum(state) != state_checksum(flipped)
