"""Property tests: reverse-mode reconstruction of hidden states is bit-exact (spec sections 2-3).

The core check does not trust the library's own runtime checksum: it runs a window forward step by step
with the backend's ``forward_step`` (fresh buffers), records every layer's integer state after every step,
then walks the window backwards with ``reverse_step`` and compares each reconstructed state with the
recorded one (``torch.equal``), and finally checks that every buffer is empty again.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_revrnn import NFRevGRU, NFRevLSTM, ReconstructionError, RevGRU, RevLSTM
from lightning_revrnn.core.backend import EAGER, Backend
from lightning_revrnn.core.fixed_point import to_fixed, to_float
from lightning_revrnn.core.numerics import AutocastState
from lightning_revrnn.core.protocol import chunk_steps
from lightning_revrnn.core.window import WindowPlan

ALL_CLASSES = (RevGRU, RevLSTM, NFRevGRU, NFRevLSTM)
FORGET_BITS = (1, 2, 3, 5, None)
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------- helpers
@st.composite
def configs(draw, classes=ALL_CLASSES, max_t=400, max_layers=3):
    """A random model and window: cell type, sizes, forget limit, dropouts, T (odd and even), batch."""
    cls = draw(st.sampled_from(classes))
    layers = draw(st.integers(1, max_layers))
    hidden = draw(st.lists(st.sampled_from([2, 4, 6, 8, 12, 16]), min_size=layers, max_size=layers))
    return dict(
        cls=cls,
        input_size=draw(st.integers(1, 5)),
        hidden=hidden if draw(st.booleans()) else hidden[0],
        layers=layers,
        bits=draw(st.sampled_from(FORGET_BITS)),
        dropout=draw(st.sampled_from([0.0, 0.3])),
        input_dropout=draw(st.sampled_from([0.0, 0.3])),
        dropconnect=draw(st.sampled_from([0.0, 0.5])),
        T=draw(st.integers(1, max_t)),
        batch=draw(st.integers(1, 4)),
        # Larger weights saturate the gates: forget values at the floor (most bits pushed, most drains)
        # and at one (nothing pushed); larger initial states exercise negative and big fixed-point values.
        weight_scale=draw(st.sampled_from([1.0, 1.0, 4.0])),
        state_scale=draw(st.sampled_from([0.0, 1.0, 50.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(cfg, mode="reverse"):
    torch.manual_seed(cfg["seed"])
    rnn = cfg["cls"](
        cfg["input_size"],
        cfg["hidden"],
        cfg["layers"],
        max_forget_bits=cfg["bits"],
        dropout=cfg["dropout"],
        input_dropout=cfg["input_dropout"],
        dropconnect=cfg["dropconnect"],
        mode=mode,
    )
    if cfg["weight_scale"] != 1.0:
        with torch.no_grad():
            for p in rnn.parameters():
                p.mul_(cfg["weight_scale"])
    x = torch.randn(cfg["T"], cfg["batch"], cfg["input_size"])
    sizes = rnn.hidden_sizes
    hx = [[torch.randn(cfg["batch"], h) * cfg["state_scale"] for h in sizes] for _ in range(rnn.state_count)]
    return rnn, x, hx


def module_hx(rnn, hx, requires_grad=False):
    """Pack per-kind lists of per-layer states as the module expects them."""
    kinds = []
    for per_layer in hx:
        per_layer = [h.clone().requires_grad_(requires_grad) for h in per_layer]
        kinds.append(per_layer if not rnn.uniform else torch.stack(per_layer).detach().requires_grad_(requires_grad))
    return kinds[0] if rnn.state_count == 1 else tuple(kinds)


def sample_masks(rnn, x, seed):
    """The masks the module samples in its forward for ``seed`` (same RNG calls, same order)."""
    torch.manual_seed(seed)
    inp = rnn._input_masks(x.shape[1], x)
    hid = [rnn._dropconnect_mask(c, x) for c in rnn.cells]
    return inp, hid


def flatten_state(h_n, rnn):
    """Layer-major list: ``[h_0, (c_0,) h_1, (c_1,) ...]``."""
    kinds = list(h_n) if rnn.state_count == 2 else [h_n]
    per_kind = [list(k.unbind(0)) if isinstance(k, torch.Tensor) else list(k) for k in kinds]
    return [per_kind[k][l] for l in range(rnn.num_layers) for k in range(len(kinds))]


def independent_roundtrip(rnn, x, hx, input_masks, hidden_masks, expect_drains=False, backend: Backend = EAGER):
    """Run the window forward with ``forward_step``, record all states, reverse with ``reverse_step`` (both on
    ``backend``).

    Returns (recorded outputs of the top layer, recorded final int states, drains per layer). Asserts exact
    reconstruction at every step and layer and empty buffers at the end.
    """
    cells = list(rnn.cells)
    T, B = x.shape[0], x.shape[1]
    window = WindowPlan.build(cells, backend, input_masks, hidden_masks, True, AutocastState.capture(x.device))
    buffers = window.new_buffers(B, T, x.device)
    n = rnn.state_count
    state = [[to_fixed(h) for h in c.split_state([hx[k][l] for k in range(n)])] for l, c in enumerate(cells)]
    recorded = [[list(s) for s in state]]  # recorded[t][l]: layer l's int halves after t steps
    inputs = {}  # (layer, chunk start) -> the layer's inputs over the chunk, as the module computes them
    outputs = []
    chunk = chunk_steps(T)  # the module's chunks: the input GEMMs on the same shapes
    with torch.no_grad():
        weights = [list(window.hidden_weights(l).split(c.hidden_rows, 0)) for l, c in enumerate(cells)]
        for t0 in range(0, T, chunk):  # chunk by chunk, layer by layer, as the module runs
            t1 = min(t0 + chunk, T)
            inp = x[t0:t1]
            for l, cell in enumerate(cells):
                inputs[l, t0] = inp
                xp = window.projection(l, inp)
                outs = []
                for t in range(t0, t1):
                    state_f = [to_float(s) for s in state[l]]
                    state[l], state_f = backend.forward_step(
                        cell, weights[l], xp[t - t0], state[l], state_f, buffers[l]
                    )
                    outs.append(cell.output(state_f))
                    if len(recorded) <= t + 1:
                        recorded.append([])
                    recorded[t + 1].append(list(state[l]))
                inp = torch.stack(outs)
            outputs.append(inp)
    finals = [list(s) for s in state]

    for buf, cell in zip(buffers, cells):
        assert buf.multiplications == T * cell.multiplications_per_step
        buf.finish()
        assert buf.stack is not None
        if not cell.forgets:
            assert not buf.stack.numel() and not bool(buf.word.any()), "a no-forgetting cell touched its buffer"

    drains = [b.stack.numel() for b in buffers if b.stack is not None]
    if expect_drains:
        assert all(d > 0 for d in drains), drains

    # Backwards, chunk by chunk; within a chunk each layer from the top, step by step (any order of
    # layers works: each has its own buffer and its inputs are recorded).
    for t0 in reversed(range(0, T, chunk)):
        t1 = min(t0 + chunk, T)
        for l in range(len(cells) - 1, -1, -1):
            cell = cells[l]
            with torch.no_grad():
                xp = window.projection(l, inputs[l, t0])
            for t in range(t1 - 1, t0 - 1, -1):
                floats = [to_float(h) for h in state[l]]
                state[l], _ = backend.reverse_step(cell, weights[l], xp[t - t0], state[l], floats, buffers[l])
                for k, (got, want) in enumerate(zip(state[l], recorded[t][l])):
                    assert got.dtype == torch.int64
                    assert torch.equal(got, want), f"layer {l}, half {k}: state before step {t} not reconstructed"
    for l, buf in enumerate(buffers):
        assert buf.is_empty(), f"buffer of layer {l} not empty after the reverse walk"
    return torch.cat(outputs), finals, drains


# ------------------------------------------------------------------------------------------- tests
@settings(SETTINGS, max_examples=30)
@given(cfg=configs())
def test_stepwise_reconstruction_is_bit_exact(cfg):
    """Independent of the runtime check: every state of every layer at every step is reconstructed."""
    rnn, x, hx = build(cfg)
    input_masks, hidden_masks = sample_masks(rnn, x, cfg["seed"] + 1)
    outputs, finals, drains = independent_roundtrip(rnn, x, hx, input_masks, hidden_masks)
    event(f"T {'odd' if cfg['T'] % 2 else 'even'}, {'>=100' if cfg['T'] >= 100 else '<100'}")
    event(f"drained: {sum(drains) > 0}")

    # The harness reproduces the module's forward bit for bit (same masks from the same seed).
    torch.manual_seed(cfg["seed"] + 1)
    with torch.no_grad():
        out, h_n = rnn(x, module_hx(rnn, hx))
    assert torch.equal(out, outputs)
    # h_n is float32 (as nn.GRU's), the correctly rounded exact state; exact_state() gives the exact one.
    flat, exact = flatten_state(h_n, rnn), flatten_state(rnn.exact_state(h_n), rnn)
    n = rnn.state_count
    for l, cell in enumerate(rnn.cells):
        want = [to_float(h, torch.float64) for h in finals[l]]
        got = cell.split_state([exact[l * n + k] for k in range(n)])
        rounded = cell.split_state([flat[l * n + k] for k in range(n)])
        for a, r, b in zip(got, rounded, want):
            assert a.dtype == torch.float64 and torch.equal(a, b)
            assert r.dtype == torch.float32 and torch.equal(r, b.float())


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bits", FORGET_BITS, ids=str)
def test_stepwise_every_cell_and_forget_limit(cls, bits):
    """Deterministic coverage of every (cell, max_forget_bits) pair, 2 layers, odd T, dropouts on."""
    cfg = dict(
        cls=cls,
        input_size=3,
        hidden=[6, 4],
        layers=2,
        bits=bits,
        dropout=0.3,
        input_dropout=0.3,
        dropconnect=0.5,
        T=37,
        batch=3,
        weight_scale=1.0,
        state_scale=1.0,
        seed=1234,
    )
    rnn, x, hx = build(cfg)
    input_masks, hidden_masks = sample_masks(rnn, x, 7)
    assert all(m is not None for m in input_masks + hidden_masks)
    independent_roundtrip(rnn, x, hx, input_masks, hidden_masks)


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
def test_stepwise_with_drains(cls):
    """Saturated forget gates with no limit push ~10 bits per multiplication: words drain into planes,
    and the walk back restores every plane and every state."""
    cfg = dict(
        cls=cls,
        input_size=2,
        hidden=4,
        layers=2,
        bits=None,
        dropout=0.0,
        input_dropout=0.0,
        dropconnect=0.0,
        T=60,
        batch=2,
        weight_scale=1.0,
        state_scale=1.0,
        seed=3,
    )
    rnn, x, hx = build(cfg)
    with torch.no_grad():
        for c in rnn.cells:  # z = σ(very negative) → z* = 1, i.e. forget everything (10 bits per multiply)
            n, rows = c.half_size, c.gate_rows * c.half_size
            # GRU gate rows per group: z, r, g; LSTM: f, i, o, p, g. Forget rows: z, or f and p.
            forget_rows = [0] if cls is RevGRU else [0, 3]
            for g in (0, 1):
                for r in forget_rows:
                    c.bias[g * rows + r * n : g * rows + (r + 1) * n].fill_(-20.0)

    input_masks, hidden_masks = [None, None], [None, None]
    independent_roundtrip(rnn, x, hx, input_masks, hidden_masks, expect_drains=True)


@settings(SETTINGS, max_examples=20)
@given(cfg=configs(max_t=300))
def test_reverse_mode_matches_store_end_to_end(cfg):
    """mode="reverse" forward+backward does not raise; outputs and final states equal mode="store"."""
    rnn, x, hx = build(cfg)
    results = {}
    for mode in ("reverse", "store"):
        rnn.mode = mode
        rnn.zero_grad()
        torch.manual_seed(cfg["seed"] + 1)
        xr = x.clone().requires_grad_()
        out, h_n = rnn(xr, module_hx(rnn, hx, requires_grad=True))
        loss = out.sum() + sum(s.sum() for s in flatten_state(h_n, rnn)).float()
        loss.backward()  # reverse mode raises ReconstructionError on any mismatch
        results[mode] = (out.detach(), [s.detach() for s in flatten_state(h_n, rnn)], rnn.memory_stats())
    out_r, fin_r, stats_r = results["reverse"]
    out_s, fin_s, stats_s = results["store"]
    assert torch.equal(out_r, out_s)
    assert len(fin_r) == len(fin_s)
    for a, b in zip(fin_r, fin_s):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert stats_r.drains == stats_s.drains
    if not rnn.cells[0].forgets:
        assert stats_r.drains == 0 and stats_r.used_bits == 0


@pytest.mark.parametrize(
    ("cls", "bits", "T"),
    [(RevGRU, None, 301), (RevLSTM, None, 200), (RevGRU, 5, 300), (RevLSTM, 3, 250)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_long_window_drains_and_reverses(cls, bits, T):
    """A window long enough to drain buffer words into planes still reverses exactly."""
    torch.manual_seed(11)
    rnn = cls(3, 8, 2, max_forget_bits=bits, dropout=0.2, input_dropout=0.2, dropconnect=0.3)
    x = torch.randn(T, 2, 3, requires_grad=True)
    torch.manual_seed(5)
    out, h_n = rnn(x)
    stats = rnn.memory_stats()
    assert stats.drains > 0, stats
    assert all(layer.drains > 0 for layer in stats.layers)
    out.sum().backward()  # must not raise ReconstructionError
    assert all(buf.is_empty() for buf in rnn.last_window.buffers)
    rnn.mode = "store"
    torch.manual_seed(5)
    out_s, h_s = rnn(x)
    assert torch.equal(out.detach(), out_s.detach())
    for a, b in zip(flatten_state(h_n, rnn), flatten_state(h_s, rnn)):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("cls", [NFRevGRU, NFRevLSTM], ids=lambda c: c.__name__)
def test_no_forgetting_cells_need_no_buffer(cls):
    """NF cells reverse exactly by additive coupling: no multiplication, no drain, no buffer bits."""
    torch.manual_seed(2)
    rnn = cls(3, [6, 10], 2, max_forget_bits=None, dropout=0.3, input_dropout=0.3, dropconnect=0.5)
    x = torch.randn(257, 2, 3, requires_grad=True)
    out, _ = rnn(x)
    stats = rnn.memory_stats()
    assert stats.drains == 0 and stats.multiplications == 0 and stats.used_bits == 0
    out.sum().backward()
    for buf in rnn.last_window.buffers:
        assert buf.is_empty()


def test_tampered_buffer_is_detected():
    """Sanity check of the tests' premise: corrupting one buffer bit breaks reconstruction, and the
    library's runtime check notices it."""
    torch.manual_seed(0)
    rnn = RevGRU(2, 4, 1, max_forget_bits=3)
    x = torch.randn(20, 2, 2, requires_grad=True)
    out, _ = rnn(x)
    record = rnn.last_window
    assert record is not None
    buf = record.buffers[0]
    word = buf.word.clone()
    word[0, 0] += 1
    buf.word = word
    with pytest.raises(ReconstructionError):
        out.sum().backward()
