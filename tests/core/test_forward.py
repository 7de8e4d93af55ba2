"""run_forward: one forward for every mode, returning its results, one host read per window."""

from __future__ import annotations

import pytest
import torch

from lightning_revrnn import FixedPointOverflowError, RevGRU
from lightning_revrnn.core.backend import EAGER
from lightning_revrnn.core.fixed_point import to_float
from lightning_revrnn.core.forward import run_forward
from lightning_revrnn.core.numerics import AutocastState
from lightning_revrnn.core.protocol import CHUNK
from lightning_revrnn.core.window import WindowPlan, state_checksum


def _plan(rnn: RevGRU, retain: bool) -> WindowPlan:
    cells = list(rnn.cell_list)
    return WindowPlan.build(
        cells, EAGER, [None] * len(cells), [None] * len(cells), retain, AutocastState.capture(torch.device("cpu"))
    )


def _zero_state(rnn: RevGRU, batch: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    state = [[torch.zeros(batch, c.half_size, dtype=torch.int64) for _ in range(c.state_halves)] for c in rnn.cell_list]
    return state, [[to_float(h) for h in s] for s in state]


def test_forward_returns_outputs_states_buffers_and_checksums_and_leaves_its_inputs_alone() -> None:
    torch.manual_seed(0)
    rnn = RevGRU(3, 4, num_layers=2)
    x = torch.randn(2 * CHUNK + 3, 2, 3)
    state, state_f = _zero_state(rnn, 2)
    given = [list(s) for s in state]
    checksums = torch.zeros(3, 2, dtype=torch.int64)
    with torch.no_grad():
        result = run_forward(_plan(rnn, retain=True), x, state, state_f, [], checksums=checksums)
        out, h_n = rnn(x)
    assert torch.equal(result.primary, out) and torch.equal(result.finals[-1], h_n[-1])
    assert all(a is b for a, b in zip(state[0], given[0])), "the caller's state lists are not rewritten"
    assert checksums[0].eq(state_checksum(state[0])).all()  # before the first chunk: the initial state
    assert [b.syncs for b in result.buffers] == [1, 1] and all(b.stack is not None for b in result.buffers)
    assert result.stored_initial is None and result.final_exact[0].dtype == torch.float64


def test_a_non_finite_input_raises_naming_the_pre_activations() -> None:
    rnn = RevGRU(3, 4)
    x = torch.randn(5, 2, 3)
    x[2, 1, 0] = float("nan")
    state, state_f = _zero_state(rnn, 2)
    with pytest.raises(FixedPointOverflowError, match="layer 0: input pre-activations"):
        run_forward(_plan(rnn, retain=False), x, state, state_f, [])
