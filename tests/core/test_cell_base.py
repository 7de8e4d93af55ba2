"""The state layout and the helpers every cell shares."""

from __future__ import annotations

import pytest
import torch

from lightning_revrnn.core.cell_base import add_output_gradient, restore_units, store_units, unbuffered
from lightning_revrnn.core.cells import RevGRUCell, RevLSTMCell
from lightning_revrnn.core.fixed_point import FORGET_ONE, to_fixed, to_float
from lightning_revrnn.core.records import GRURecord, LSTMRecord, Record


@pytest.mark.parametrize("cls", [RevGRUCell, RevLSTMCell])
def test_split_and_join_state_are_inverse_and_groups_own_their_halves(cls: type) -> None:
    cell = cls(3, 8)
    full = [torch.randn(2, 8) for _ in range(cell.halves_per_group)]
    halves = cell.split_state(full)
    assert len(halves) == cell.state_halves and all(h.shape == (2, 4) for h in halves)
    assert all(torch.equal(a, b) for a, b in zip(cell.join_state(halves), full))
    assert cell.own(0) == [0, 2][: cell.halves_per_group] and cell.own(1) == [1, 3][: cell.halves_per_group]


def test_floats_before_reads_the_old_halves_from_named_records() -> None:
    t = [torch.full((1, 2), float(i)) for i in range(10)]
    other, a, b, c, d, e = t[:6]  # the fields before h_old: values the helper does not read
    gru: list[Record] = [GRURecord(other, a, b, c, d, e, h_old=t[6]), GRURecord(other, a, b, c, d, e, h_old=t[7])]
    assert RevGRUCell.floats_before(gru) == [t[6], t[7]]
    lstm: list[Record] = [
        LSTMRecord(other, a, b, c, d, e, h_old=t[6], c_old=t[8], c_new=t[0]),
        LSTMRecord(other, a, b, c, d, e, h_old=t[7], c_old=t[9], c_new=t[0]),
    ]
    assert RevLSTMCell.floats_before(lstm) == [t[6], t[7], t[8], t[9]]


def test_output_gradient_goes_to_both_halves_or_to_the_stored_units() -> None:
    d_state = [torch.zeros(2, 4), torch.zeros(2, 4)]
    full = add_output_gradient(d_state, torch.arange(16.0).view(2, 8))
    assert torch.equal(torch.cat(full, 1), torch.arange(16.0).view(2, 8))
    stored = add_output_gradient(d_state, torch.ones(2, 3))
    assert stored[0][:, :3].eq(1).all() and stored[0][:, 3:].eq(0).all() and stored[1].eq(0).all()


def test_stored_units_bypass_the_buffer_and_round_trip() -> None:
    zq = torch.full((2, 4), 300)
    held = unbuffered(zq, 2)
    assert held is not None and held[:, :2].eq(FORGET_ONE).all() and held[:, 2:].eq(300).all()
    assert unbuffered(None, 2) is None and unbuffered(zq, 0) is zq
    h = to_fixed(torch.randn(2, 4))
    value = torch.randn(2, 4)
    stored = store_units(h, 2, value)
    assert torch.equal(stored[:, 2:], h[:, 2:]) and torch.equal(stored[:, :2], to_fixed(value[:, :2]))
    assert torch.equal(to_fixed(to_float(stored[:, :2])), stored[:, :2])  # float32 holds a stored unit exactly
    assert torch.equal(restore_units(stored, h[:, :2]), h)
