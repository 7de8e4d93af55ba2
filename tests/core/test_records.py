"""Named records: what a reverse half-step hands its backward, the same fields for every backend."""

from __future__ import annotations

import torch

from lightning_revrnn.core.backend import EAGER
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cells import RevGRUCell, RevLSTMCell
from lightning_revrnn.core.fixed_point import to_fixed, to_float
from lightning_revrnn.core.records import GRURecord, LSTMRecord


def _records(cell_cls: type) -> list:
    torch.manual_seed(0)
    cell = cell_cls(3, 8)
    buf = InformationBuffer((2, 4), torch.device("cpu"), 3, retain=True)
    state = [to_fixed(torch.randn(2, 4) * 0.3) for _ in range(cell.state_halves)]
    w = list(cell.weight_hh.detach().split(cell.hidden_rows, 0))
    xp = cell.project_input(torch.randn(2, 3)).detach()
    with torch.no_grad():
        after, after_f = EAGER.forward_step(cell, w, xp, state, [to_float(s) for s in state], buf)
        before, records = EAGER.reverse_step(cell, w, xp, after, after_f, buf)
    assert all(torch.equal(a, b) for a, b in zip(before, state))
    return records


def test_gru_records_hold_the_gates_by_name_with_z_and_r_views_of_the_block() -> None:
    records = _records(RevGRUCell)
    assert all(isinstance(r, GRURecord) for r in records)
    r = records[0]
    assert r.zr is not None and torch.equal(torch.cat([r.z, r.r], 1), r.zr)
    assert r.z.data_ptr() == r.zr.data_ptr()  # a view, not a copy
    assert r.z_used.le(1).all() and r.z_used.gt(0).all()


def test_lstm_records_hold_old_and_new_cell_states() -> None:
    records = _records(RevLSTMCell)
    assert all(isinstance(r, LSTMRecord) for r in records)
    assert records[0].sig.shape == (2, 16) and records[0].c_old.shape == records[0].c_new.shape == (2, 4)
