"""The fused backend (``fused=True``, :class:`~lightning_revrnn.fused.FusedBackend`): compiled stages checked
against the eager reference backend.

Integer stages: bit for bit against :func:`reversible_multiply` / :func:`reversible_divide` (inductor's
int64 floor division and remainder included). Whole windows: every forward state rebuilt bit for bit by
the fused reverse sweep (the independent stepwise harness of ``tests/core/test_cells.py`` on the fused
backend), padding, stored units, and gradients against ``mode="store"`` to a tolerance (the fused gates may
round a forget value differently from the eager ones, so the two trajectories are close, not equal).

Every test that compiles is marked ``compile`` and left out of the default run (``make test-compile`` or
``pytest -m compile``). They share small shapes so that each stage compiles a few times in all.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_cells import build, independent_roundtrip, sample_masks
from test_masks import right_padded

from lightning_revrnn import NFRevGRU, NFRevLSTM, RevGRU, RevLSTM
from lightning_revrnn.core.backend import EAGER, EagerBackend, backend_for
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import add_output_gradient
from lightning_revrnn.core.errors import FusedPathError
from lightning_revrnn.core.fixed_point import FORGET_ONE, reversible_divide, reversible_multiply, to_float
from lightning_revrnn.core.records import GRURecord
from lightning_revrnn.fused import FusedBackend, StageCounter, default_backend

compile_marker = pytest.mark.compile
B, N = 3, 8  # the integer stages' shape, shared by every test here
#: The backend ``fused=True`` modules use: the tests that call it directly share its compiled stages with them.
FUSED = default_backend()
stages = FUSED.stages  # its Stages: the integer stages are tested through them

CPU = torch.device("cpu")


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
def test_buffer_round_trip_through_the_fused_hooks_with_drains():
    """The fused backend's multiply and divide through the buffer's hooks (``begin_multiply``/``end_multiply``
    around its integer stage, then ``begin_divide``/``end_divide``) with drains between them: many
    multiplications at small ``z*`` drain words, and dividing in reverse order restores every ``h`` and
    empties the buffer; the fused and the reference buffer (:meth:`InformationBuffer.multiply`) hold the same
    words, slots and accounting."""
    g = torch.Generator().manual_seed(3)
    fused_buf = InformationBuffer((B, N), torch.device("cpu"), None, retain=True)
    eager_buf = InformationBuffer((B, N), torch.device("cpu"), None, retain=True)
    h = torch.randint(-(2**30), 2**30, (B, N), generator=g)
    steps = []
    for _ in range(20):
        z = torch.randint(1, 4, (B, N), generator=g)
        add = torch.randint(-(2**20), 2**20, (B, N), generator=g)
        new, new_f = FUSED._apply(fused_buf, h, z, add)
        assert torch.equal(new, eager_buf.multiply(h, z) + add) and torch.equal(new_f, to_float(new))
        assert torch.equal(fused_buf.word, eager_buf.word)
        assert fused_buf.multiplications == eager_buf.multiplications
        steps.append((h, z, add))
        h = new
    fused_buf.finish()
    eager_buf.finish()
    assert fused_buf.stack is not None and eager_buf.stack is not None and fused_buf.stack.numel() > 0
    assert torch.equal(fused_buf.stack, eager_buf.stack)
    torch.testing.assert_close(float(fused_buf.stats(1).optimal_bits), float(eager_buf.stats(1).optimal_bits))
    for old, z, add in reversed(steps):
        h, h_f = FUSED._undo(fused_buf, h, z, add)
        assert torch.equal(h, old) and torch.equal(h_f, to_float(old))
    assert fused_buf.is_empty()


# --------------------------------------------------------------------------------- whole windows
def counted_backend() -> FusedBackend:
    """A fresh fused backend whose stage calls are counted (it shares the compiled graphs of :data:`FUSED`)."""
    return FusedBackend(StageCounter())


def assert_ran_stages(backend: FusedBackend, cell, multiplications: int) -> None:
    """The harness ran on ``backend``'s stages (not the eager cells): every buffered multiplication went
    through an integer stage and was undone by one."""
    counter = backend.stages.counter
    assert counter is not None  # a counted backend (counted_backend())
    calls = counter.calls
    assert calls[f"{cell.kind}_gates{(cell.max_forget_bits, cell.forgets)}"] > 0, calls
    if cell.forgets:
        assert calls["multiply_add_logged"] == calls["subtract_divide"] == multiplications, calls
    else:
        assert calls["add_term"] == calls["subtract_term"] > 0 and not calls["multiply_add_logged"], calls


@compile_marker
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM, NFRevGRU, NFRevLSTM], ids=lambda c: c.__name__)
def test_fused_reverse_rebuilds_every_state_bit_for_bit(cls):
    """The stepwise harness of test_cells on the fused backend: every layer's state after every step
    of a 2-layer window with dropouts is rebuilt bit for bit, and the buffers end empty."""
    cfg = dict(
        cls=cls,
        input_size=5,
        hidden=2 * N,
        layers=2,
        bits=3 if cls in (RevGRU, RevLSTM) else None,
        dropout=0.3,
        input_dropout=0.3,
        dropconnect=0.5,
        T=37,
        batch=B,
        weight_scale=4.0,
        state_scale=1.0,
        seed=11,
    )
    rnn, x, hx = build(cfg)
    input_masks, hidden_masks = sample_masks(rnn, x, 5)
    backend = counted_backend()
    with torch.no_grad():  # the stages run where no autograd records, as in the module
        independent_roundtrip(rnn, x, hx, input_masks, hidden_masks, backend=backend)
    assert_ran_stages(backend, rnn.cells[0], multiplications=2 * 37 * rnn.cells[0].multiplications_per_step)


@compile_marker
def test_fused_reverse_with_drains_rebuilds_every_state():
    """No forget limit and saturated gates: words drain (check points fall inside steps) and still every
    state comes back."""
    cfg = dict(
        cls=RevLSTM,
        input_size=5,
        hidden=2 * N,
        layers=1,
        bits=None,
        dropout=0.0,
        input_dropout=0.0,
        dropconnect=0.0,
        T=40,
        batch=B,
        weight_scale=4.0,
        state_scale=1.0,
        seed=3,
    )
    rnn, x, hx = build(cfg)
    backend = counted_backend()
    with torch.no_grad():
        _, _, drains = independent_roundtrip(rnn, x, hx, [None], [None], expect_drains=True, backend=backend)
    assert drains[0] > 0
    assert_ran_stages(backend, rnn.cells[0], multiplications=40 * rnn.cells[0].multiplications_per_step)


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
    """A RevGRU forward on a fresh fused backend with ``torch.compile`` replaced by ``fake_compile`` raises
    FusedPathError matching ``match`` (a fresh backend: its stages compile now, and the shared default backend's
    compiled stages are left alone)."""
    monkeypatch.setattr(torch, "compile", fake_compile)
    rnn = RevGRU(5, 2 * N, 1, fused=FusedBackend())
    with pytest.raises(FusedPathError, match=match):
        rnn(torch.randn(3, B, 5, requires_grad=True))


def test_failed_compile_names_the_fix(monkeypatch):
    """A stage that cannot compile raises FusedPathError saying to use fused=False."""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    _fused_forward_raises(monkeypatch, broken_compile, "fused=False")


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    """``fused="auto"`` where the fused backend cannot compile: one RuntimeWarning naming the cause, the window
    rerun on the reference (the same masks, so the same results as a ``fused=False`` module), ``fused`` False
    from then on and no further warning. (Here the CPU stands in for CUDA, the device "auto" picks.)"""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr("lightning_revrnn.core.backend.AUTO_FUSED_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr("lightning_revrnn.fused.default_backend", FusedBackend)  # a fresh one: it compiles now
    torch.manual_seed(0)
    rnn = RevGRU(5, 2 * N, 2, dropout=0.3, dropconnect=0.5)
    reference = copy.deepcopy(rnn)
    reference.fused = False
    x = torch.randn(7, B, 5)

    def train_step(module):
        torch.manual_seed(1)  # the same dropout masks for both modules
        out, h_n = module(x.clone().requires_grad_())
        (out.sum() + h_n.square().sum()).backward()
        return out.detach(), h_n.detach(), [p.grad for p in module.parameters()]

    with pytest.warns(RuntimeWarning, match=r"fused='auto'.*failed.*no C\+\+ compiler.*fused=False"):
        got = train_step(rnn)
    assert rnn.fused is False
    want = train_step(reference)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(got[2], want[2], strict=True):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_step(rnn)
    rnn.fused = True  # asked for explicitly, the failure raises
    with pytest.raises(FusedPathError, match=r"no C\+\+ compiler"):
        train_step(rnn)


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


class SpyBackend(EagerBackend):
    """The reference backend, counting which of its methods a window called."""

    name = "spy"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"half_forward": 0, "half_reverse": 0, "step_backward": 0}

    def half_forward(self, *args, **kwargs):
        self.calls["half_forward"] += 1
        return super().half_forward(*args, **kwargs)

    def half_reverse(self, *args, **kwargs):
        self.calls["half_reverse"] += 1
        return super().half_reverse(*args, **kwargs)

    def step_backward(self, *args, **kwargs):
        self.calls["step_backward"] += 1
        return super().step_backward(*args, **kwargs)


def test_fused_switch_and_store_mode_stays_eager():
    """``fused`` is settable later (True/False or a backend), and the backend is chosen once per window: the
    fused one (or the injected one) only where autograd records nothing; ``mode="store"`` training (autograd
    recording) gets the eager reference."""
    assert backend_for(False, differentiable=False, device=CPU) is EAGER
    assert backend_for(True, differentiable=True, device=CPU) is EAGER  # grad recording: eager
    assert backend_for(True, differentiable=False, device=CPU) is default_backend()
    injected = FusedBackend()
    assert backend_for(injected, differentiable=False, device=CPU) is injected
    assert backend_for(injected, differentiable=True, device=CPU) is EAGER

    rnn = RevLSTM(5, [2 * N, 4], 2)
    assert rnn.fused == "auto" and "fused" not in repr(rnn)  # the default: fused on CUDA, the reference here
    assert backend_for("auto", differentiable=False, device=CPU) is EAGER
    assert backend_for("auto", differentiable=False, device=torch.device("cuda")) is default_backend()
    assert backend_for("auto", differentiable=True, device=torch.device("cuda")) is EAGER
    rnn.fused = True
    assert rnn.fused is True and "fused=True" in repr(rnn)
    with pytest.raises(TypeError, match="fused must be True, False or 'auto'"):
        rnn.fused = 1  # type: ignore[assignment]  # the wrong type on purpose: the setter rejects it

    # Which backend a window's plan gets: an injected backend runs every half-step where nothing records.
    spy = SpyBackend()
    rnn.fused = spy
    x = torch.randn(6, B, 5)
    rnn.mode = "store"
    rnn(x.clone().requires_grad_())[0].sum().backward()  # autograd records the window: the reference
    assert spy.calls == {"half_forward": 0, "half_reverse": 0, "step_backward": 0}
    with torch.no_grad():  # evaluation: the injected backend
        rnn(x)
    assert spy.calls == {"half_forward": 2 * 2 * 6, "half_reverse": 0, "step_backward": 0}
    rnn.mode = "reverse"  # training by reversal: the forward, reverse and backward all on the injected backend
    out, _ = rnn(x.clone().requires_grad_())
    assert rnn.last_window is not None and rnn.last_window.plan.backend is spy
    out.sum().backward()
    assert spy.calls == {"half_forward": 2 * 2 * 6 * 2, "half_reverse": 2 * 2 * 6, "step_backward": 2 * 6}


# ---------------------------------------------------------------------------------- backward stage
def reference_record(record):
    """A fused record as the reference backward reads it: a RevGRU's ``σ([z; r])`` as one block (the fused
    gates return ``z`` and ``r`` apart, ``zr`` None)."""
    if isinstance(record, GRURecord) and record.zr is None:
        return record._replace(zr=torch.cat([record.z, record.r], 1))
    return record


def fused_form(record):
    """A reference record in the form the fused reverse returns: a RevGRU's ``z``, ``r`` apart and
    contiguous, ``zr`` None (the reference's are views of ``zr``)."""
    if isinstance(record, GRURecord):
        return record._replace(z=record.z.contiguous(), r=record.r.contiguous(), zr=None)
    return record


def step_records(backend, cell, w, xp, state, keep, stored):
    """One step forward and back on ``backend`` from ``state`` (int halves; its first ``stored`` units of
    ``h1`` stored): the two groups' records. The reverse rebuilds ``state`` bit for bit."""
    buf = InformationBuffer((B, cell.half_size), torch.device("cpu"), cell.max_forget_bits, retain=True)
    after, after_f = backend.forward_step(cell, w, xp, state, [to_float(s) for s in state], buf, keep, stored)
    stored_old = state[0][:, :stored] if stored else None
    before, records = backend.reverse_step(cell, w, xp, after, after_f, buf, keep, stored_old)
    for got, want in zip(before, state, strict=True):
        assert torch.equal(got, want)
    assert buf.is_empty()
    return records


@compile_marker
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM, NFRevGRU, NFRevLSTM], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("masked", "stored"), [(False, 0), (True, 3)], ids=["outputs", "keep+stored"])
def test_backward_stage_matches_eager_backward(cls, masked, stored):
    """The compiled step backward against the reference ``cell.backward_step`` on the same records, state
    gradient and output gradient (``(B, S)`` for stored units), floats, so to a tolerance: on the records the
    fused reverse hands it (a RevGRU's ``σ([z; r])`` joined for the reference), and on the reference's own
    records (in the fused form). Each backend's records come from its own step forward and back from the
    same state."""
    torch.manual_seed(5)
    cell = cls(5, 2 * N, 1, max_forget_bits=3 if cls in (RevGRU, RevLSTM) else None).cells[0]
    n = cell.half_size
    w = list((cell.weight_hh.detach() * 3).split(cell.hidden_rows, 0))
    xp = cell.project_input(torch.randn(B, 5)).detach() * 3
    state = [torch.randint(-(2**23), 2**23, (B, n)) for _ in range(cell.state_halves)]
    keep = torch.tensor([[True], [False], [True]]) if masked else None
    grads = [torch.randn(B, n) for _ in range(cell.state_halves)]
    d_output = torch.randn(B, stored or 2 * n)
    with torch.no_grad():
        fused_records = step_records(FUSED, cell, w, xp, state, keep, stored)
        eager_records = step_records(EAGER, cell, w, xp, state, keep, stored)
        if cell.kind == "gru":  # the fused gates return z and r apart
            assert all(r.zr is None and r.z.is_contiguous() for r in fused_records)
        for records, want_records in (
            (fused_records, [reference_record(r) for r in fused_records]),
            ([fused_form(r) for r in eager_records], eager_records),
        ):
            got, got_pre = FUSED.step_backward(cell, w, records, grads, d_output, keep)
            want, want_pre = cell.backward_step(w, want_records, grads, d_output, keep)
            torch.testing.assert_close(got_pre, want_pre, atol=1e-5, rtol=1e-4)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            if masked:  # a masked row passes its state gradient (plus its output gradient) through, its gates get none
                assert torch.equal(got_pre[1], torch.zeros_like(got_pre[1]))
                for a, d in zip(got, add_output_gradient(grads, d_output), strict=True):
                    torch.testing.assert_close(a[1], d[1])
