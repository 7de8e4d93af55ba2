"""The forward-time checks that a head or stem declares what it reads."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_revrnn import StepHead
from lightning_revrnn.core.graph_checks import check_declared_inputs, declared_context, trainable
from lightning_revrnn.core.numerics import AutocastState

AUTOCAST = AutocastState("cpu", False, torch.bfloat16)


class ReadsMemory(StepHead):
    def __init__(self, memory: Tensor, declare: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.memory, self.declare = memory, declare

    def forward(self, output: Tensor, start: int) -> Tensor:
        return (self.proj(output) * self.memory).sum()

    def context(self) -> list[Tensor]:
        return [self.memory] if self.declare else []


def test_a_declared_context_passes_and_an_undeclared_one_raises_with_the_fix() -> None:
    memory = torch.randn(4, requires_grad=True) * 2  # not a leaf: made by another module
    x = torch.zeros(3, 2, 5)
    check_declared_inputs(ReadsMemory(memory, declare=True), None, AUTOCAST, x, top_size=4)
    with pytest.raises(RuntimeError, match="context"):
        check_declared_inputs(ReadsMemory(memory, declare=False), None, AUTOCAST, x, top_size=4)


def test_trainable_and_declared_context_list_what_needs_a_gradient() -> None:
    head = ReadsMemory(torch.randn(4), declare=True)  # a memory that needs no gradient
    assert trainable(head) == list(head.proj.parameters()) and declared_context(head) == []
    assert trainable(None) == [] and declared_context(None) == []
