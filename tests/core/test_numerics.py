"""The float settings forward and reverse share."""

from __future__ import annotations

import pytest
import torch

from lightning_revrnn import ReconstructionError, RevGRU
from lightning_revrnn.core.numerics import AutocastState, matmul_precision_state


def test_autocast_state_is_captured_and_re_entered() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = AutocastState.capture(torch.device("cpu"))
    assert state == AutocastState("cpu", True, torch.bfloat16)
    with state.enter():
        assert torch.is_autocast_enabled("cpu")
    with AutocastState("cpu", False, torch.bfloat16).enter():
        assert not torch.is_autocast_enabled("cpu")


def test_a_matmul_precision_change_between_forward_and_backward_is_refused() -> None:
    rnn = RevGRU(3, 4)
    out, _ = rnn(torch.randn(5, 2, 3, requires_grad=True))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if before != "medium" else "high")
        assert matmul_precision_state() != ()
        with pytest.raises(ReconstructionError, match="precision changed"):
            out.sum().backward()
    finally:
        torch.set_float32_matmul_precision(before)
