"""The fused path (``fused=True``): compiled stages checked against the eager reference.

Integer stages: bit for bit against :func:`reversible_multiply` / :func:`reversible_divide` (inductor's
int64 floor division and remainder included). Whole windows: every forward state rebuilt bit for bit by
the fused reverse sweep (the independent stepwise harness of ``test_reversal``), padding, stored units, and
gradients against ``mode="store"`` to a tolerance (the fused gates may round a forget value differently
from the eager ones, so the two trajectories are close, not equal).

Every test that compiles is marked ``compile`` and left out of the default run (``make test-compile`` or
``pytest -m compile``). They share small shapes so that each stage compiles a few times in all.
"""

from __future__ import annotations

import pytest
import torch

from lightning_revrnn import NFRevGRU, NFRevLSTM, RevGRU, RevLSTM
from lightning_revrnn import fused as stages
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.errors import FusedPathError
from lightning_revrnn.core.fixed_point import FORGET_ONE, reversible_divide, reversible_multiply, to_float
from test_masks import right_padded
from test_cells import build, independent_roundtrip, sample_masks

compile_marker = pytest.mark.compile
B, N = 3, 8  # the integer stages' shape, shared by every test here


# ------------------------------------------------------------------------------ integer stages
def edge_case_operands(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, z, word, add)`` of shape (B, N): random values plus the edges, negative and large ``h``,
    ``z*`` of 1 and ``2^R_Z``, words up to just below ``2^53`` (the largest a word reaches before a
    multiplication), zero words and additive terms of both signs."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-(2**52), 2**52, (B, N), generator=g)
    z = torch.randint(1, FORGET_ONE + 1, (B, N), generator=g)
    word = torch.randint(0, 2**53, (B, N), generator=g)
    add = torch.randint(-(2**23), 2**23 + 1, (B, N), generator=g)
    h[0, :4] = torch.tensor([-1, 0, -(2**52), 2**52 - 1])
    z[0, :4] = torch.tensor([1, FORGET_ONE, 1, FORGET_ONE])
    z[1, :3] = torch.tensor([1, 3, FORGET_ONE - 1])
    word[0, :4] = torch.tensor([0, 2**53 - 1, 2**53 - 1, 0])
    word[1, :2] = torch.tensor([2**53 - 1, 1])
    h[1, :3] = torch.tensor([-(2**52), -1, -(2**40) - 7])
    return h, z, word, add


@compile_marker
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_stages_match_eager_bit_for_bit(seed):
    h, z, word, add = edge_case_operands(seed)
    want_h, want_word = reversible_multiply(h, z, word)
    want_h = want_h + add
    got_h, got_f, got_word = stages.multiply_add(False)(h, z, word, add)
    assert torch.equal(got_h, want_h) and torch.equal(got_word, want_word)
    assert torch.equal(got_f, to_float(want_h))
    log2 = torch.full((B, N), 0.5, dtype=torch.float64)
    got_h2, _, got_word2, got_log2 = stages.multiply_add(True)(h, z, word, add, log2)
    assert torch.equal(got_h2, want_h) and torch.equal(got_word2, want_word)
    torch.testing.assert_close(got_log2, log2 + torch.log2(z).double())
    # The inverse restores the operands exactly, and agrees with the eager inverse.
    back_h, back_f, back_word = stages.subtract_divide()(want_h, add, z, want_word)
    eager_h, eager_word = reversible_divide(want_h - add, z, want_word)
    assert torch.equal(back_h, h) and torch.equal(back_word, word)
    assert torch.equal(back_h, eager_h) and torch.equal(back_word, eager_word)
    assert torch.equal(back_f, to_float(h))
    h_add, f_add = stages.add_term()(h, add)
    assert torch.equal(h_add, h + add) and torch.equal(f_add, to_float(h + add))
    assert torch.equal(stages.subtract_term()(h_add, add)[0], h)


@compile_marker
def test_compiled_floor_division_and_remainder_follow_torch():
    """Inductor's int64 floor division, remainder and arithmetic shift round towards -inf as torch's do
    (C's ``/`` and ``%`` truncate: a negative numerator is where they would differ)."""
    a = torch.tensor([-7, 7, -8, 8, -1, 0, -(2**52) - 3, 2**52 + 5, -1025, 1023]).repeat(2, 1)
    b = torch.tensor([2, 2, 3, 3, 1024, 5, 7, 1000, 1024, 1])[None].repeat(2, 1)

    def ops(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.div(x, y, rounding_mode="floor"), torch.remainder(x, y), x >> 10, x & 1023

    got = torch.compile(ops, dynamic=False, fullgraph=True)(a, b)
    for g, w in zip(got, ops(a, b)):
        assert torch.equal(g, w)


@compile_marker
def test_buffer_fused_multiply_and_divide_round_trip_with_drains():
    """The buffer's fused multiply/divide with check points between them: many multiplications at the
    smallest ``z*`` drain words, and dividing in reverse order restores every ``h`` and empties the buffer;
    the fused and eager buffers hold the same words, drains and accounting."""
    g = torch.Generator().manual_seed(3)
    fused_buf = InformationBuffer((B, N), torch.device("cpu"), None, retain=True)
    eager_buf = InformationBuffer((B, N), torch.device("cpu"), None, retain=True)
    h = torch.randint(-(2**30), 2**30, (B, N), generator=g)
    steps = []
    for _ in range(20):
        z = torch.randint(1, 4, (B, N), generator=g)
        add = torch.randint(-(2**20), 2**20, (B, N), generator=g)
        new, _ = fused_buf.fused_multiply(h, z, add)
        assert torch.equal(new, eager_buf.multiply(h, z) + add)
        assert torch.equal(fused_buf.word, eager_buf.word)
        steps.append((h, z, add))
        h = new
    assert fused_buf.drained_before == eager_buf.drained_before and fused_buf.drained_before
    torch.testing.assert_close(float(fused_buf.stats(1).optimal_bits), float(eager_buf.stats(1).optimal_bits))
    for old, z, add in reversed(steps):
        h, h_f = fused_buf.fused_divide(h, add, z)
        assert torch.equal(h, old) and torch.equal(h_f, to_float(old))
    assert fused_buf.is_empty()


# --------------------------------------------------------------------------------- whole windows
@compile_marker
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM, NFRevGRU, NFRevLSTM], ids=lambda c: c.__name__)
def test_fused_reverse_rebuilds_every_state_bit_for_bit(cls):
    """The stepwise harness of test_reversal with the fused cells: every layer's state after every step
    of a 2-layer window with dropouts is rebuilt bit for bit, and the buffers end empty."""
    cfg = dict(cls=cls, input_size=5, hidden=2 * N, layers=2, bits=3 if cls in (RevGRU, RevLSTM) else None,
               dropout=0.3, input_dropout=0.3, dropconnect=0.5, T=37, batch=B, weight_scale=4.0, state_scale=1.0,
               seed=11)
    rnn, x, hx = build(cfg)
    rnn.fused = True
    input_masks, hidden_masks = sample_masks(rnn, x, 5)
    with torch.no_grad():  # the stages run where no autograd records, as in the module
        independent_roundtrip(rnn, x, hx, input_masks, hidden_masks)


@compile_marker
def test_fused_reverse_with_drains_rebuilds_every_state():
    """No forget limit and saturated gates: words drain (check points fall inside steps) and still every
    state comes back."""
    cfg = dict(cls=RevLSTM, input_size=5, hidden=2 * N, layers=1, bits=None, dropout=0.0, input_dropout=0.0,
               dropconnect=0.0, T=40, batch=B, weight_scale=4.0, state_scale=1.0, seed=3)
    rnn, x, hx = build(cfg)
    rnn.fused = True
    with torch.no_grad():
        _, _, drains = independent_roundtrip(rnn, x, hx, [None], [None], expect_drains=True)
    assert drains[0] > 0


def gradients(rnn, x, keep=None):
    """(output, input gradient, parameter gradients) of ``out.sum()`` weighted by a fixed pattern."""
    x = x.clone().requires_grad_()
    out, _ = rnn(x, keep=keep)
    weight = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    (out * weight).sum().backward()
    grads = [p.grad.clone() for p in rnn.parameters()]
    rnn.zero_grad()
    return out.detach(), x.grad, grads


def assert_close_to_store(rnn, x, keep=None):
    """Fused ``mode="reverse"`` against eager ``mode="store"`` on the same model and input: outputs and
    gradients close (the gates differ in their last bits, so a forget value may round the other way)."""
    rnn.mode = "reverse"
    out_f, dx_f, grads_f = gradients(rnn, x, keep)  # backward raises ReconstructionError if not exact
    rnn.mode = "store"
    out_s, dx_s, grads_s = gradients(rnn, x, keep)
    torch.testing.assert_close(out_f, out_s, atol=2e-3, rtol=0)
    torch.testing.assert_close(dx_f, dx_s, atol=2e-3, rtol=2e-2)
    for a, b in zip(grads_f, grads_s):
        scale = b.abs().max().item() + 1e-6
        assert (a - b).abs().max().item() <= 2e-2 * scale, (a - b).abs().max()


@compile_marker
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
def test_fused_gradients_close_to_store_with_padding(cls):
    """Two layers, right-padded batch (keep mask): the fused reverse sweep reconstructs exactly (its
    checksums pass) and its gradients agree with the eager ``mode="store"`` ones to a tolerance."""
    torch.manual_seed(0)
    rnn = cls(5, 2 * N, 2, fused=True)
    x = torch.randn(21, B, 5)
    keep = right_padded([21, 9, 15], 21)
    assert_close_to_store(rnn, x, keep)
    assert_close_to_store(rnn, x)


@compile_marker
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
def test_fused_stored_units(cls):
    """Stored units (attention slices) with the fused cells: the exact stored values come back as outputs,
    the reverse sweep restores them, and gradients match ``mode="store"`` to a tolerance."""
    torch.manual_seed(1)
    rnn = cls(5, 2 * N, 1, stored_units=3, fused=True)
    assert_close_to_store(rnn, torch.randn(19, B, 5))


@compile_marker
def test_second_window_does_not_recompile():
    """Compile once per shape: a second window of the same shapes (a different T, a different input) adds
    no compiled graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(2)
    rnn = RevGRU(5, 2 * N, 1, fused=True)
    rnn(torch.randn(17, B, 5, requires_grad=True))[0].sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the fused stages did compile
    rnn(torch.randn(33, B, 5, requires_grad=True))[0].sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs


@compile_marker
def test_fused_evaluation_matches_fused_training_forward():
    """Evaluation (no grad, nothing retained) and the training forward run the same compiled stages: equal
    outputs bit for bit."""
    torch.manual_seed(4)
    rnn = RevLSTM(5, 2 * N, 1, fused=True)
    x = torch.randn(20, B, 5)
    with torch.no_grad():
        out_eval, _ = rnn(x)
    out_train, _ = rnn(x.clone().requires_grad_())
    assert torch.equal(out_eval, out_train.detach())


# ----------------------------------------------------------------------------------- no compiling
def _fused_forward_raises(monkeypatch, fake_compile, match: str) -> None:
    """A fused RevGRU forward with ``torch.compile`` replaced by ``fake_compile`` raises FusedPathError matching ``match``."""
    monkeypatch.setattr(torch, "compile", fake_compile)
    stages._stage.cache_clear()
    try:
        rnn = RevGRU(5, 2 * N, 1, fused=True)
        with pytest.raises(FusedPathError, match=match):
            rnn(torch.randn(3, B, 5, requires_grad=True))
    finally:
        stages._stage.cache_clear()


def test_failed_compile_names_the_fix(monkeypatch):
    """A stage that cannot compile raises FusedPathError saying to use fused=False."""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    _fused_forward_raises(monkeypatch, broken_compile, "fused=False")


def test_recompile_limit_names_batch_sizes_as_the_fix(monkeypatch):
    """Past dynamo's recompile limit (fullgraph stages fail hard there, never falling back to eager, which could
    round differently in reverse) the error says why and how to avoid it."""

    class FailOnRecompileLimitHit(Exception):  # the name dynamo's exception has
        pass

    def compile_that_hits_the_limit(fn, **kwargs):
        def compiled(*args):
            raise FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")

        return compiled

    _fused_forward_raises(monkeypatch, compile_that_hits_the_limit, "distinct shapes.*drop_last=True")


def test_fused_switch_reaches_the_cells_and_store_mode_stays_eager():
    """``fused`` is plumbed to every cell, settable later, and ``mode="store"`` (autograd recording) does
    not use the stages."""
    rnn = RevLSTM(5, [2 * N, 4], 2)
    assert not any(c.fused for c in rnn.cells)
    rnn.fused = True
    assert all(c.fused for c in rnn.cells) and "fused=True" in repr(rnn)
    assert not rnn.cells[0].uses_fused()  # grad enabled: eager
    with torch.no_grad():
        assert rnn.cells[0].uses_fused()
    with pytest.raises(TypeError, match="fused must be True or False"):
        rnn.fused = 1


# ---------------------------------------------------------------------------------- backward stage
def fused_record(cell, record):
    """The fused path's record from the eager one: a RevGRU's ``σ([z; r])`` split into ``z, r``."""
    if cell.halves_per_group == 2:
        return record
    other, r_other, zr, g, zs, h_old = record
    return (other, r_other, zr[:, : cell.half_size], zr[:, cell.half_size :], g, zs, h_old)


@compile_marker
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM, NFRevGRU, NFRevLSTM], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("masked", "stored"), [(False, 0), (True, 3)], ids=["outputs", "keep+stored"])
def test_backward_stage_matches_eager_backward(cls, masked, stored):
    """The compiled step backward against the eager ``backward_step`` on the same records, state gradient and
    output gradient (added first, as the eager sweep does; ``(B, S)`` for stored units): floats, so to a
    tolerance."""
    torch.manual_seed(5)
    cell = cls(5, 2 * N, 1, max_forget_bits=3 if cls in (RevGRU, RevLSTM) else None).cells[0]
    n = cell.half_size
    w = list((cell.weight_hh.detach() * 3).split(cell.hidden_rows, 0))
    xp = cell.project_input(torch.randn(B, 5)).detach() * 3
    state = [torch.randint(-(2**23), 2**23, (B, n)) for _ in range(cell.state_halves)]
    keep = torch.tensor([[True], [False], [True]]) if masked else None
    buf = InformationBuffer((B, n), torch.device("cpu"), cell.max_forget_bits, retain=True)
    with torch.no_grad():
        after, _ = cell.forward_step(w, xp, state, [to_float(s) for s in state], buf, keep)
        _, records = cell.reverse_step(w, xp, after, buf, keep)
        grads = [torch.randn(B, n) for _ in range(cell.state_halves)]
        d_output = torch.randn(B, stored or 2 * n)
        want = list(grads)
        if stored:
            want[0] = want[0] + torch.nn.functional.pad(d_output, (0, n - stored))
        else:
            want[0], want[1] = want[0] + d_output[:, :n], want[1] + d_output[:, n:]
        want, want_pre = cell.backward_step(w, records, want, keep)
        cell.fused = True
        got, got_pre = cell.fused_backward_step(w, [fused_record(cell, r) for r in records], grads, d_output, keep)
    torch.testing.assert_close(got_pre, want_pre, atol=1e-5, rtol=1e-4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    if masked:  # a masked row passes its state gradient through and gives its gates none
        assert torch.equal(got_pre[1], torch.zeros_like(got_pre[1]))
