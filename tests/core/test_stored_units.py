"""Stored units: ``ReversibleRNN(..., stored_units=S)`` stores the first S units of the top layer's h1
every step instead of buffering them (the paper's attention slices, spec section 5).

* The module returns them, ``(T, B, S)``: the exact values of the state (float32 holds them exactly).
* ``mode="reverse"`` gradients equal ``mode="store"``, padded batches and 1-2 layers included, and the
  reverse sweep restores the units from the returned tensor (its checksums pass over many chunks, with
  drains).
* None of their bits enters the buffer (their words stay zero); a masked step leaves them unchanged; the
  accounting counts them as ``stored_bits`` = 32 per unit and step.
"""

from __future__ import annotations

import pytest
import torch
from test_masks import compare_modes, fixed_point_hx, pack, right_padded, unpack

from lightning_revrnn import NFRevGRU, RevGRU, RevLSTM, StepHead
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cells import RevGRUCell, RevLSTMCell
from lightning_revrnn.core.fixed_point import to_fixed, to_float

CLASSES = (RevGRU, RevLSTM, NFRevGRU)
IDS = lambda v: getattr(v, "__name__", str(v))  # noqa: E731


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_stored_units_reverse_gradients_equal_store_with_padding(cls, layers):
    torch.manual_seed(layers)
    T, B, S = 37, 4, 3  # three chunks, the last one short
    rnn = cls(5, 8, num_layers=layers, stored_units=S, dropout=0.2 if layers == 2 else 0.0)
    x = torch.randn(T, B, 5)
    rev, _sto = compare_modes(rnn, x, fixed_point_hx(rnn, B), right_padded([T, 30, 17, 1], T))
    assert rev[0].shape == (T, B, S)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_returned_units_are_the_exact_state(cls):
    torch.manual_seed(0)
    T, B, S = 20, 3, 2
    rnn = cls(4, 6, num_layers=2, stored_units=S)
    stored, h_n = rnn(torch.randn(T, B, 4, requires_grad=True))
    full_rnn = cls(4, 6, num_layers=2, stored_units=S)
    full_rnn.load_state_dict(rnn.state_dict())
    h = unpack(rnn, rnn.exact_state(h_n))[-rnn.state_count]  # the top layer's h, float64
    assert stored.dtype == torch.float32 and stored.shape == (T, B, S)
    assert torch.equal(stored[-1].double(), h[:, :S]), "the last stored units are not the exact final state"


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=IDS)
def test_stored_units_keep_out_of_the_buffer_and_are_counted(cls):
    torch.manual_seed(1)
    T, B, S, H = 40, 3, 3, 10
    rnn = cls(4, H, num_layers=2, stored_units=S, max_forget_bits=None)  # forgets a lot: words fill, drains
    out, _ = rnn(torch.randn(T, B, 4, requires_grad=True))
    top, bottom = rnn.last_window.buffers[1], rnn.last_window.buffers[0]
    stats = rnn.memory_stats()
    assert stats.stored_bits == 32 * T * B * S
    assert stats.layers[1].stored_bits == 32 * T * B * S and stats.layers[0].stored_bits == 0
    plain = cls(4, H, num_layers=2, max_forget_bits=None)
    plain.load_state_dict(rnn.state_dict())
    plain(torch.randn(T, B, 4, requires_grad=True))
    assert plain.memory_stats().stored_bits == 0
    assert stats.drains > 0
    out.sum().backward()  # restored from the returned tensor: the sweep's checksums pass
    assert top.is_empty() and bottom.is_empty()


@pytest.mark.parametrize("cell_cls", [RevGRUCell, RevLSTMCell], ids=IDS)
def test_stored_units_push_no_bits_into_the_buffer(cell_cls):
    """Group 1's update of h1 with stored units: their buffer words stay empty, the others fill."""
    torch.manual_seed(4)
    B, S = 3, 2
    cell = cell_cls(4, 8, max_forget_bits=None)
    buf = InformationBuffer((B, 4), torch.get_default_device(), None, retain=True)
    own = [to_fixed(torch.rand(B, 4) - 0.5) for _ in range(cell.halves_per_group)]
    other = torch.rand(B, 4) - 0.5
    xp = cell.project_input(torch.randn(B, 4))[:, : cell.hidden_rows]
    w = cell.weight_hh[: cell.hidden_rows].detach()
    with torch.no_grad():
        new, _ = cell.half_forward(w, xp, other, own, [to_float(h) for h in own], buf, None, stored=S)
    if cell.halves_per_group == 1:
        assert not bool(buf.word[:, :S].any()), "stored units pushed bits into the buffer"
    assert bool(buf.word[:, S:].any())
    assert torch.equal(to_fixed(to_float(new[0][:, :S])), new[0][:, :S])


def test_masked_steps_leave_stored_units_unchanged():
    torch.manual_seed(2)
    T, B, S = 12, 3, 2
    rnn = RevGRU(4, 6, stored_units=S)
    hx = fixed_point_hx(rnn, B)
    stored, _ = rnn(torch.randn(T, B, 4), pack(rnn, hx), keep=right_padded([T, 5, 0], T))
    assert torch.equal(stored[5:, 1], stored[4, 1].expand(T - 5, S))
    assert torch.equal(stored[:, 2], hx[0][None, 2, :S].expand(T, S)), "an all-masked example moved"


def test_carry_across_windows_is_exact_with_stored_units():
    """The next window starts from the exact state: the float32 h_n (resolved through the module's exact
    carry) and the float64 exact state give the same window, and its stored units start where the last
    window's ended."""
    torch.manual_seed(3)
    rnn = RevLSTM(4, 6, stored_units=2)
    x = torch.randn(32, 2, 4)
    with torch.no_grad():
        first, h_first = rnn(x[:16])
        exact = rnn.exact_state(h_first)
        from_rounded, h_a = rnn(x[16:], h_first)
        from_exact, h_b = rnn(x[16:], exact)
        alone, _ = rnn(x[16:17], h_first)
    assert torch.equal(from_rounded, from_exact) and torch.equal(h_a[1], h_b[1])
    assert torch.equal(alone[0], from_exact[0])
    assert isinstance(exact, tuple) and isinstance(exact[0], torch.Tensor)  # (h, c), one layer: tensors
    assert torch.equal(exact[0][0, :, :2], first[-1].double()), "stored units are not float32-exact"


def test_bad_stored_units_raise_with_a_fix():
    with pytest.raises(ValueError, match="between 0 and half the top layer's hidden size \\(4\\)"):
        RevGRU(4, [12, 8], num_layers=2, stored_units=5)

    class Head(StepHead):
        def forward(self, output, start):
            return output.sum()

    rnn = RevGRU(4, 8, stored_units=2)
    with pytest.raises(ValueError, match="stored_units and a head do not combine"):
        rnn(torch.randn(3, 2, 4, requires_grad=True), head=Head())
