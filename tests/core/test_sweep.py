"""Gradients of training by reversal: equal to ordinary autograd, and to the spec's equations.

* ``mode="reverse"`` (states reconstructed in backward) against ``mode="store"`` (autograd through the
  same fixed-point forward): input, initial state (h and c), every parameter, also with a per-step
  :class:`StepHead` and with the final state in the loss.
* Exact state carry across consecutive windows, and ``batch_first``.
* Reverse-mode gradients against a plain float32 re-implementation of the RevGRU/RevLSTM equations of
  spec section 2 (forget values rounded to R_Z bits in value, straight-through in gradient).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_revrnn import NFRevGRU, NFRevLSTM, RevGRU, RevLSTM, StepHead
from lightning_revrnn.core.backend import EAGER
from lightning_revrnn.core.dropout import SeededMask
from lightning_revrnn.core.fixed_point import to_fixed, to_float
from lightning_revrnn.core.forward import run_forward
from lightning_revrnn.core.numerics import AutocastState
from lightning_revrnn.core.protocol import CHUNK, LONG_CHUNK, LONG_WINDOW, chunk_steps
from lightning_revrnn.core.window import WindowPlan

ALL_CLASSES = (RevGRU, RevLSTM, NFRevGRU, NFRevLSTM)
IDS = lambda v: getattr(v, "__name__", str(v))  # noqa: E731


# ----------------------------------------------------------------------------------------- helpers
def make_hx(rnn, batch, scale=0.5, seed=0):
    """Initial state as the module takes it (tensor (L, B, H) or per-layer list), one per state kind."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    kinds = []
    for _ in range(rnn.state_count):
        layers = [torch.randn(batch, h, generator=g) * scale for h in rnn.hidden_sizes]
        kinds.append(torch.stack(layers) if rnn.uniform else layers)
    return kinds


def leaves(kinds):
    """Fresh leaf copies requiring grad (tensors or lists of tensors)."""
    out: list[torch.Tensor | list[torch.Tensor]] = []
    for k in kinds:
        if isinstance(k, torch.Tensor):
            out.append(k.detach().clone().requires_grad_())
        else:
            out.append([t.detach().clone().requires_grad_() for t in k])
    return out


def pack(rnn, kinds):
    return kinds[0] if rnn.state_count == 1 else tuple(kinds)


def state_list(h_n, rnn):
    """Layer-major flat list of a returned state."""
    kinds = list(h_n) if rnn.state_count == 2 else [h_n]
    per = [list(k.unbind(0)) if isinstance(k, torch.Tensor) else list(k) for k in kinds]
    return [per[k][l] for l in range(rnn.num_layers) for k in range(len(kinds))]


def flat_tensors(kinds):
    return [t for k in kinds for t in ([k] if isinstance(k, torch.Tensor) else k)]


def close(actual, expected, rtol=1e-5, atol_frac=1e-6, what=""):
    """assert_close with an absolute tolerance relative to the gradient's scale."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol_frac * max(scale, 1e-12), msg=lambda m: f"{what}: {m}"
    )


def run(rnn, mode, x, hx, seed, out_w, state_w, head=None):
    """One forward+backward; returns (loss, primary, final states, grads of x, of hx tensors, of params)."""
    rnn.mode = mode
    rnn.zero_grad(set_to_none=True)
    if head is not None:
        head.zero_grad(set_to_none=True)
    xl = x.detach().clone().requires_grad_()
    hl = leaves(hx)
    torch.manual_seed(seed)
    primary, h_n = rnn(xl, pack(rnn, hl), head=head) if head is not None else rnn(xl, pack(rnn, hl))
    finals = state_list(h_n, rnn)
    loss = primary if head is not None else (primary * out_w).sum()
    loss = loss + sum((f * w).sum() for f, w in zip(finals, state_w)).float()
    loss.backward()
    params = {n: p.grad.clone() for n, p in rnn.named_parameters()}
    if head is not None:
        params.update({f"head.{n}": p.grad.clone() for n, p in head.named_parameters()})
    return (
        loss.detach(),
        primary.detach(),
        [f.detach() for f in finals],
        xl.grad,
        [t.grad for t in flat_tensors(hl)],
        params,
    )


def compare_modes(rnn, x, hx, seed=123, head=None, rtol=1e-5, atol_frac=None):
    T, B = x.shape[0], x.shape[1]
    # A parameter gradient sums T·B per-step terms in float32 in a different order in each mode: each order is
    # within T·B·2^-24 of the exact sum, relative to the terms' size (here: the gradient's scale).
    atol_frac = max(1e-6, 2 * T * B * 2.0**-24) if atol_frac is None else atol_frac
    g = torch.Generator(torch.get_default_device()).manual_seed(99)
    out_w = torch.randn(T, B, rnn.hidden_sizes[-1], generator=g)
    state_w = [
        torch.randn(B, h, generator=g, dtype=torch.float64) for h in rnn.hidden_sizes for _ in range(rnn.state_count)
    ]
    rev = run(rnn, "reverse", x, hx, seed, out_w, state_w, head)
    sto = run(rnn, "store", x, hx, seed, out_w, state_w, head)
    assert torch.equal(rev[1], sto[1]), "forward outputs differ between modes"
    for a, b in zip(rev[2], sto[2]):
        assert torch.equal(a, b), "final states differ between modes"
    torch.testing.assert_close(rev[0], sto[0], rtol=1e-6, atol=0.0)
    close(rev[3], sto[3], rtol, atol_frac, "grad x")
    assert len(rev[4]) == len(sto[4]) == len(flat_tensors(hx))
    for i, (a, b) in enumerate(zip(rev[4], sto[4])):
        assert a is not None and b is not None
        close(a, b, rtol, atol_frac, f"grad hx[{i}]")
    assert rev[5].keys() == sto[5].keys()
    for name in sto[5]:
        assert rev[5][name].abs().sum() > 0 or sto[5][name].abs().sum() == 0
        close(rev[5][name], sto[5][name], rtol, atol_frac, f"grad {name}")
    return rev, sto


# ------------------------------------------------------------------------------- reverse vs store
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bits", [3, None], ids=str)
def test_reverse_gradients_equal_store(cls, layers, bits):
    torch.manual_seed(0)
    rnn = cls(3, 8, layers, max_forget_bits=bits, dropout=0.3, input_dropout=0.2, dropconnect=0.4)
    x = torch.randn(23, 3, 3)
    compare_modes(rnn, x, make_hx(rnn, 3))


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
def test_long_window_chunks_by_eight_and_equals_store(cls):
    """A window longer than LONG_WINDOW steps runs in LONG_CHUNK-step chunks (a ragged last one), the same
    gradients as autograd through the stored forward, every state rebuilt bit for bit."""
    assert (chunk_steps(LONG_WINDOW), chunk_steps(LONG_WINDOW + 1)) == (CHUNK, LONG_CHUNK) == (4, 8)
    torch.manual_seed(5)
    rnn = cls(3, 4, 2, max_forget_bits=3, dropout=0.2, dropconnect=0.3)
    compare_modes(rnn, torch.randn(LONG_WINDOW + 11, 2, 3), make_hx(rnn, 2))


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
def test_reverse_gradients_equal_store_per_layer_sizes(cls):
    """Layers of different sizes (states as lists) and a window long enough to drain."""
    torch.manual_seed(1)
    rnn = cls(2, [10, 4], max_forget_bits=None, dropout=0.3, input_dropout=0.3, dropconnect=0.3)
    x = torch.randn(120, 2, 2)
    compare_modes(rnn, x, make_hx(rnn, 2, scale=1.0))
    if rnn.cells[0].forgets:
        assert rnn.memory_stats().drains > 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cls=st.sampled_from(ALL_CLASSES),
    layers=st.integers(1, 2),
    bits=st.sampled_from([1, 2, 3, 5, None]),
    T=st.integers(1, 60),
    batch=st.integers(1, 4),
    hidden=st.sampled_from([2, 4, 6]),
    seed=st.integers(0, 2**16),
)
def test_reverse_gradients_equal_store_property(cls, layers, bits, T, batch, hidden, seed):
    torch.manual_seed(seed)
    rnn = cls(2, hidden, layers, max_forget_bits=bits, dropout=0.3, input_dropout=0.3, dropconnect=0.3)
    x = torch.randn(T, batch, 2)
    compare_modes(rnn, x, make_hx(rnn, batch, seed=seed), seed=seed)


class Decoder(StepHead):
    """Linear decoder + cross-entropy of step ``step`` against fixed targets."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, vocab)
        self.targets: torch.Tensor | None = None

    def forward(self, output, start):
        """Sum over the chunk's steps of the batch-mean cross-entropy."""
        assert self.targets is not None  # set by the test before the run
        targets = self.targets[start : start + output.shape[0]]
        return F.cross_entropy(self.lin(output).flatten(0, 1), targets.flatten(), reduction="sum") / output.shape[1]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_step_head_reverse_equals_store(cls, layers):
    torch.manual_seed(4)
    rnn = cls(3, 6, layers, max_forget_bits=2, dropout=0.3, input_dropout=0.2, dropconnect=0.3)
    head = Decoder(6, 7)
    T, B = 19, 3
    head.targets = torch.randint(0, 7, (T, B))
    x = torch.randn(T, B, 3)
    rev, sto = compare_modes(rnn, x, make_hx(rnn, B), head=head)
    assert rev[1].dim() == 0  # the head's summed loss
    assert torch.equal(rev[1], sto[1])
    for name in ("head.lin.weight", "head.lin.bias"):
        assert rev[5][name].abs().sum() > 0


# ----------------------------------------------------------------------------------- state carry
def manual_two_windows(rnn, x, T):
    """Reference for two consecutive windows: one int state carried, buffers restarted at the boundary
    (each window owns a fresh buffer). Eval, no dropout. Returns (outputs, final int states)."""
    cells = list(rnn.cells)
    L, B = len(cells), x.shape[1]
    window = WindowPlan.build(cells, EAGER, [None] * L, [None] * L, False, AutocastState.capture(x.device))
    state = [[torch.zeros(B, c.half_size, dtype=torch.int64) for _ in range(c.state_halves)] for c in cells]
    outs: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in (x[:T], x[T:]):
            state_f = [[to_float(s) for s in st_] for st_ in state]
            result = run_forward(window, chunk, state, state_f, [])
            state = result.state
            outs += result.primary
    return torch.stack(outs), state


def check_carry(rnn, x, T, o1, h1, o2, h2):
    o = torch.cat([o1, o2])
    ref_out, ref_state = manual_two_windows(rnn, x, T)
    assert torch.equal(o.detach(), ref_out)
    for l, (cell, full) in enumerate(zip(rnn.cells, _per_layer(rnn.exact_state(h2), rnn))):
        got = [to_fixed(h) for h in cell.split_state([f.detach() for f in full])]
        for a, b in zip(got, ref_state[l]):
            assert torch.equal(a, b)
    # h_n is float32 (as nn.GRU's); exact_state() is exact: converting it to fixed point loses nothing.
    for t, e in zip(state_list(h1, rnn), state_list(rnn.exact_state(h1), rnn)):
        assert t.dtype == torch.float32 and e.dtype == torch.float64 and torch.equal(e.float(), t.detach())
        assert torch.equal(to_float(to_fixed(e), torch.float64), e)


#: Two windows of a no-forgetting model vs one window over the same steps, when the window boundary is
#: not a multiple of CHUNK. The first layer's input projections then run as GEMMs over different row
#: counts, which any BLAS may round differently in the last bit (≤ a few float32 ulps of a pre-activation).
#: Without a buffer nothing else differs, so each half update ``h ← h + round((1 - z)·g)`` can differ by at
#: most 2 fixed-point units of 2^-23 directly (a float difference below 1.5 units moves a rounding by at
#: most 2); there are 2 updates per layer and step, so 2 layers × 66 steps give at most 528 units if
#: the differences were not amplified. Later gates read the differing state (Lipschitz ≲ 1 for these
#: small random weights), so allow twice that: 1024 units = 2^-13 ≈ 1.2e-4. Measured: ≤ 8 units. A real
#: bug (a chunk read at the wrong offset, a lost carry) moves the outputs by O(0.1).
UNALIGNED_CARRY_ATOL = 2.0**-13


def assert_no_buffer_windows_compose(rnn, x):
    """A no-forgetting model (no buffer) over ``x`` (66 steps) in one window vs two: bit-identical where
    both windows start on chunk boundaries (32 + 32: the same GEMMs on the same shapes and data),
    within :data:`UNALIGNED_CARRY_ATOL` where they do not (33 + 33)."""
    assert not rnn.cells[0].forgets and x.shape[0] == 66
    with torch.no_grad():
        for T, exact in ((2 * CHUNK, True), (33, False)):
            whole, h = rnn(x[: 2 * T])
            o1, h1 = rnn(x[:T])
            o2, h2 = rnn(x[T : 2 * T], h1)
            got = [torch.cat([o1, o2]), *state_list(rnn.exact_state(h2), rnn)]
            want = [whole, *state_list(rnn.exact_state(h), rnn)]
            for a, b in zip(got, want, strict=True):
                if exact:
                    assert torch.equal(a, b)
                else:
                    torch.testing.assert_close(a, b, rtol=0, atol=UNALIGNED_CARRY_ATOL)


def _per_layer(h_n, rnn):
    flat = state_list(h_n, rnn)
    n = rnn.state_count
    return [flat[l * n : (l + 1) * n] for l in range(rnn.num_layers)]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
def test_state_carry_eval(cls):
    torch.manual_seed(5)
    rnn = cls(3, 8, 2, max_forget_bits=3, dropout=0.3, input_dropout=0.3, dropconnect=0.3).eval()
    T = 2 * CHUNK  # window starts on chunk boundaries: the same GEMMs on the same shapes either way
    x = torch.randn(2 * T, 2, 3)
    with torch.no_grad():
        o, h = rnn(x)
        o1, h1 = rnn(x[:T])
        o2, h2 = rnn(x[T:], h1)
    check_carry(rnn, x, T, o1, h1, o2, h2)
    assert torch.equal(o[:T], o1)
    if not rnn.cells[0].forgets:
        # No buffer and aligned chunks: one window of 2T is bit-identical to two windows of T.
        assert torch.equal(o, torch.cat([o1, o2]))
        for a, b in zip(state_list(h, rnn), state_list(h2, rnn)):
            assert torch.equal(a, b)
    else:
        # Each window starts with an empty buffer, so from step T on the buffers hold different integers
        # and each multiplication injects a different ``B mod z*`` (< z* ≤ 2^10 units of 2^-23, i.e. < 2^-13)
        # into the state; forgetting damps earlier differences, so a few multiplications' worth remain.
        torch.testing.assert_close(torch.cat([o1, o2]), o, rtol=0, atol=1e-2)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
def test_state_carry_train_reverse(cls):
    """Train mode, reverse backward on each window (truncated BPTT): the carried state is exact and equal
    to the eval forward of the same windows."""
    torch.manual_seed(6)
    rnn = cls(3, 6, 2, max_forget_bits=5, mode="reverse").train()
    T = 33
    x = torch.randn(2 * T, 2, 3)
    xr = x.clone().requires_grad_()
    o1, h1 = rnn(xr[:T])
    (o1.sum() + sum(s.sum() for s in state_list(h1, rnn))).backward()
    h1d = pack(rnn, [k.detach() for k in (h1 if rnn.state_count == 2 else (h1,))])
    o2, h2 = rnn(xr[T:], h1d)
    (o2.sum() + sum(s.sum() for s in state_list(h2, rnn))).backward()
    check_carry(rnn, x, T, o1, h1, o2, h2)
    with torch.no_grad():
        e1, g1 = rnn(x[:T])
        e2, g2 = rnn(x[T:], g1)
    assert torch.equal(torch.cat([o1, o2]).detach(), torch.cat([e1, e2]))
    for a, b in zip(state_list(h2, rnn), state_list(g2, rnn)):
        assert torch.equal(a.detach(), b)
    if not rnn.cells[0].forgets:
        assert_no_buffer_windows_compose(rnn, x)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
def test_gradient_through_carried_state(cls):
    """Backpropagating through two windows joined by the (non-detached) carried state: reverse == store."""
    torch.manual_seed(8)
    rnn = cls(2, 6, 2, max_forget_bits=3, dropout=0.2, dropconnect=0.2)
    x = torch.randn(30, 2, 2)
    grads = {}
    for mode in ("reverse", "store"):
        rnn.mode = mode
        rnn.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        torch.manual_seed(3)
        o1, h1 = rnn(xr[:15])
        o2, h2 = rnn(xr[15:], h1)
        loss = (o1**2).sum() + (o2**2).sum() + sum((s**2).sum() for s in state_list(h2, rnn)).float()
        loss.backward()
        grads[mode] = {"x": xr.grad, **{n: p.grad for n, p in rnn.named_parameters()}}
    for name, g in grads["store"].items():
        close(grads["reverse"][name], g, what=name)


# ------------------------------------------------------------------------------------- batch_first
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
@pytest.mark.parametrize("mode", ["reverse", "store"])
def test_batch_first_equals_transposed(cls, mode):
    T, B = 17, 3
    x = torch.randn(T, B, 4)
    results = []
    for batch_first in (False, True):
        torch.manual_seed(10)
        rnn = cls(4, 6, 2, dropout=0.3, input_dropout=0.3, dropconnect=0.3, batch_first=batch_first, mode=mode)
        hx = leaves(make_hx(rnn, B))
        xin = (x.transpose(0, 1) if batch_first else x).clone().requires_grad_()
        torch.manual_seed(11)
        out, h_n = rnn(xin, pack(rnn, hx))
        if batch_first:
            assert out.shape == (B, T, 6)
            out = out.transpose(0, 1)
        g = torch.Generator(torch.get_default_device()).manual_seed(0)
        loss = (out * torch.randn(out.shape, generator=g)).sum() + sum(s.sum() for s in state_list(h_n, rnn)).float()
        loss.backward()
        assert xin.grad is not None
        xg = xin.grad.transpose(0, 1) if batch_first else xin.grad
        results.append(
            (
                out.detach(),
                state_list(h_n, rnn),
                xg,
                [t.grad for t in flat_tensors(hx)],
                {n: p.grad for n, p in rnn.named_parameters()},
            )
        )
    a, b = results
    assert torch.equal(a[0], b[0])
    for s, t in zip(a[1], b[1]):
        assert torch.equal(s.detach(), t.detach())
    close(b[2], a[2], what="grad x")
    for s, t in zip(b[3], a[3]):
        close(s, t, what="grad hx")
    for name in a[4]:
        close(b[4][name], a[4][name], what=name)


# ------------------------------------------------------------------- against the spec's equations
def _forget(z, bits):
    """Spec section 3: limit to ``bits``, round to 10 bits in value, straight-through in gradient."""
    if bits is not None:
        z = (1 - 2.0**-bits) * z + 2.0**-bits
    low = 1.0 if bits is None else 2.0 ** (10 - bits)
    zq = torch.clamp(torch.round(z.detach() * 1024), low, 1024) / 1024
    return z + (zq - z.detach())


def float_reference(cell, x, h0, in_mask, hh_mask, kind):
    """Plain float32 RevGRU / RevLSTM (spec section 2) with the library's parameter layout:
    ``weight_ih``/``bias`` rows per group (group 1 first), ``weight_hh`` rows per group.
    Returns the per-step outputs and the final state halves."""
    n = cell.half_size
    rows = cell.gate_rows * n
    w_hh = cell.weight_hh if hh_mask is None else cell.weight_hh * hh_mask
    halves = [s for full in h0 for s in full.split(n, 1)]  # h1, h2 (, c1, c2)
    outs = []
    for t in range(x.shape[0]):
        xt = x[t] if in_mask is None else x[t] * in_mask
        for g in (0, 1):
            W_x = cell.weight_ih[g * rows : (g + 1) * rows]
            b = cell.bias[g * rows : (g + 1) * rows]
            W_h = w_hh[g * rows : (g + 1) * rows]
            other = halves[1 - g]
            if kind == "gru":
                # [z; r] = σ(W [x; h_other]);  g = tanh(U [x; r ∘ h_other]);  h ← z h + (1 - z) g
                zr = torch.sigmoid(xt @ W_x[: 2 * n].T + b[: 2 * n] + other @ W_h[: 2 * n].T)
                z, r = zr[:, :n], zr[:, n:]
                cand = torch.tanh(xt @ W_x[2 * n :].T + b[2 * n :] + (r * other) @ W_h[2 * n :].T)
                z = _forget(z, cell.max_forget_bits)
                halves[g] = z * halves[g] + (1 - z) * cand
            else:
                # [f; i; o; p] = σ(W [x; h_other]);  g = tanh(U [x; h_other]);
                # c ← f c + i g;  h ← p h + o tanh(c)
                pre = xt @ W_x.T + b + other @ W_h.T
                f, i, o, p = torch.sigmoid(pre[:, : 4 * n]).split(n, 1)
                cand = torch.tanh(pre[:, 4 * n :])
                f, p = _forget(f, cell.max_forget_bits), _forget(p, cell.max_forget_bits)
                halves[2 + g] = f * halves[2 + g] + i * cand
                halves[g] = p * halves[g] + o * torch.tanh(halves[2 + g])
        outs.append(torch.cat(halves[:2], 1))
    return torch.stack(outs), halves


@pytest.mark.parametrize(("cls", "kind"), [(RevGRU, "gru"), (RevLSTM, "lstm")], ids=["RevGRU", "RevLSTM"])
@pytest.mark.parametrize("bits", [3, None], ids=str)
def test_reverse_gradients_follow_the_spec_equations(cls, kind, bits):
    torch.manual_seed(12)
    T, B, I, H = 20, 3, 4, 8
    rnn = cls(I, H, 1, max_forget_bits=bits, input_dropout=0.3, dropconnect=0.4, mode="reverse")
    x = torch.randn(T, B, I)
    hx = make_hx(rnn, B, scale=0.5)
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    out_w = torch.randn(T, B, H, generator=g)
    state_w = torch.randn(B, H, generator=g)

    # Library, reverse mode.
    xl = x.clone().requires_grad_()
    hl = leaves(hx)
    torch.manual_seed(13)
    out, h_n = rnn(xl, pack(rnn, hl))
    h_top = state_list(h_n, rnn)[0]
    ((out * out_w).sum() + (h_top.float() * state_w).sum()).backward()
    lib = {"x": xl.grad, "h0": flat_tensors(hl)[0].grad[0], **{n: p.grad.clone() for n, p in rnn.named_parameters()}}

    # The same masks, drawn from the same seed in the module's order (input mask, then DropConnect).
    torch.manual_seed(13)
    in_mask = torch.empty(B, I).bernoulli_(0.7).div_(0.7)
    hh_mask = SeededMask.sample(tuple(rnn.cells[0].weight_hh.shape), 0.4, x.device).materialize()

    rnn.zero_grad(set_to_none=True)
    xf = x.clone().requires_grad_()
    hf = [k[0].clone().requires_grad_() for k in hx]  # layer 0 of each kind
    ref_out, ref_halves = float_reference(rnn.cells[0], xf, hf, in_mask, hh_mask, kind)
    ref_h = torch.cat(ref_halves[:2], 1)
    # The value of the float model tracks the fixed-point one closely ...
    torch.testing.assert_close(ref_out, out.detach(), rtol=0, atol=2e-3)
    ((ref_out * out_w).sum() + (ref_h * state_w).sum()).backward()
    ref = {"x": xf.grad, "h0": hf[0].grad, **{n: p.grad for n, p in rnn.named_parameters()}}
    # ... and so does the gradient.
    for name in ref:
        close(lib[name], ref[name], rtol=1e-2, atol_frac=2e-3, what=name)
    if kind == "lstm":
        assert hf[1].grad is not None and flat_tensors(hl)[1].grad is not None
        close(flat_tensors(hl)[1].grad[0], hf[1].grad, rtol=1e-2, atol_frac=2e-3, what="c0")


# ------------------------------------------------------------------------------------ edge cases
def _grads_after(cls, mode, step):
    torch.manual_seed(0)
    rnn = cls(3, 6, 2, max_forget_bits=3, dropout=0.2, dropconnect=0.2, mode=mode)
    x = torch.randn(12, 2, 3, requires_grad=True)
    torch.manual_seed(1)
    step(rnn, x)
    return {"x": x.grad, **{n: p.grad for n, p in rnn.named_parameters()}}


def _x_without_grad(rnn, x):
    out, _ = rnn(x.detach())
    (out**2).sum().backward()


def _frozen_input_weights(rnn, x):
    rnn.cells[0].weight_ih.requires_grad_(False)
    out, _ = rnn(x)
    (out**2).sum().backward()


def _loss_on_final_state_only(rnn, x):
    _, h_n = rnn(x)
    sum((s**2).sum() for s in state_list(h_n, rnn)).backward()


def _loss_on_outputs_only(rnn, x):
    out, _ = rnn(x)
    (out**2).sum().backward()


def _second_backward_retain_graph(rnn, x):
    out, h_n = rnn(x)
    (out**2).sum().backward(retain_graph=True)
    sum((s**2).sum() for s in state_list(h_n, rnn)).backward()


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=IDS)
@pytest.mark.parametrize(
    "step",
    [_x_without_grad, _frozen_input_weights, _loss_on_final_state_only, _loss_on_outputs_only],
    ids=lambda f: f.__name__.strip("_"),
)
def test_partial_gradients_reverse_equals_store(cls, step):
    rev, sto = _grads_after(cls, "reverse", step), _grads_after(cls, "store", step)
    for name, g in sto.items():
        if g is None:
            assert rev[name] is None, name
        else:
            close(rev[name], g, what=name)


@pytest.mark.parametrize("cls", [NFRevGRU, NFRevLSTM], ids=["NFRevGRU", "NFRevLSTM"])
def test_second_backward_with_retain_graph(cls):
    """No buffer to consume: NF cells support a second backward through the same graph."""
    rev = _grads_after(cls, "reverse", _second_backward_retain_graph)
    sto = _grads_after(cls, "store", _second_backward_retain_graph)
    for name, g in sto.items():
        close(rev[name], g, what=name)


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=["RevGRU", "RevLSTM"])
def test_second_backward_of_forgetting_cells_raises_a_clear_error(cls):
    """The reverse sweep consumes the buffer: a second backward says so instead of reconstructing garbage."""
    rnn = cls(3, 4, mode="reverse")
    out, _ = rnn(torch.randn(6, 2, 3, requires_grad=True))
    (out**2).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        (out**2).sum().backward()
