"""The fused backend's Triton kernels (:mod:`lightning_revrnn.fused.triton_kernels`) against the reference
arithmetic: integers and float32 values bit for bit, the accounting's ``log2 z*`` to tolerance.

On the CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here for the import only),
which computes int64 exactly; with ``REVRNN_TEST_DEVICE=cuda`` (``make gpu-check``) they run compiled on the GPU.
Skipped where Triton is not installed.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch
from test_cells import build, independent_roundtrip, sample_masks
from test_fused import B, N, edge_case_operands

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.core.buffer import DRAIN_BITS, FLOOR, DrainSite, InformationBuffer, PopSite
from lightning_revrnn.core.fixed_point import FORGET_ONE, reversible_divide, reversible_multiply, to_float
from lightning_revrnn.fused import FusedBackend, StageCounter

pytest.importorskip("triton")
MODULE = "lightning_revrnn.fused.triton_kernels"
#: Where the kernels run: the CPU (interpreted) unless ``make gpu-check`` sets ``REVRNN_TEST_DEVICE=cuda``.
TEST_DEVICE = os.environ.get("REVRNN_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """The kernels module, imported under the interpreter on the CPU (Triton reads the flag at decoration)."""
    interpret = TEST_DEVICE == "cpu"
    before = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop(MODULE, None)
    try:
        return importlib.import_module(MODULE)
    finally:
        if interpret:
            if before is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = before


def operands(seed: int) -> tuple[torch.Tensor, ...]:
    """The integer stages' edge cases (``tests/fused/test_fused.py``), on the test device."""
    with torch.device("cpu"):
        return tuple(t.to(TEST_DEVICE) for t in edge_case_operands(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiply_add_matches_the_reference_bit_for_bit(kernels, seed):
    h, z, word, add = operands(seed)
    want_h, want_word = reversible_multiply(h, z, word)
    want_h = want_h + add
    got_h, got_f, got_word = kernels.multiply_add(h, z, word, add)
    assert torch.equal(got_h, want_h) and torch.equal(got_word, want_word)
    assert torch.equal(got_f, to_float(want_h))
    log2 = torch.full((B, N), 0.5, dtype=torch.float64, device=h.device)
    got_h2, got_f2, got_word2, got_log2 = kernels.multiply_add_logged(h, z, word, add, log2)
    assert torch.equal(got_h2, want_h) and torch.equal(got_word2, want_word) and torch.equal(got_f2, got_f)
    torch.testing.assert_close(got_log2, log2 + torch.log2(z).double())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subtract_divide_matches_the_reference_and_inverts(kernels, seed):
    h, z, word, add = operands(seed)
    # the reference inverse on arbitrary operands (h* of both signs: Triton's truncating // corrected)
    want_h, want_word = reversible_divide(h - add, z, word)
    got_h, got_f, got_word = kernels.subtract_divide(h, add, z, word)
    assert torch.equal(got_h, want_h) and torch.equal(got_word, want_word)
    assert torch.equal(got_f, to_float(want_h))
    # and the kernels' round trip restores the operands
    mult_h, _, mult_word = kernels.multiply_add(h, z, word, add)
    back_h, back_f, back_word = kernels.subtract_divide(mult_h, add, z, mult_word)
    assert torch.equal(back_h, h) and torch.equal(back_word, word) and torch.equal(back_f, to_float(h))


def test_strided_forget_values(kernels):
    """``z*`` as a column slice of a wider tensor (the RevLSTM's ``f*``, ``p*``): row strides, no copy."""
    h, z, word, add = operands(3)
    wide = torch.cat([z, torch.full_like(z, 7), z.flip(1)], 1)
    sliced = wide[:, 2 * N :]
    assert not sliced.is_contiguous()
    want_h, want_word = reversible_multiply(h, sliced, word)
    got_h, _, got_word = kernels.multiply_add(h, sliced, word, add)
    assert torch.equal(got_h, want_h + add) and torch.equal(got_word, want_word)


def test_buffer_round_trip_through_the_kernels(kernels):
    """Many multiplications through one buffer (its drains between them), then their inverses in reverse
    order: the buffer is empty again and every state comes back bit for bit."""
    g = torch.Generator().manual_seed(4)
    buf = InformationBuffer((B, N), torch.device(TEST_DEVICE), max_forget_bits=3, retain=True)
    h = torch.randint(-(2**40), 2**40, (B, N), generator=g).to(TEST_DEVICE)
    history = []
    for _ in range(60):
        z = torch.randint(FORGET_ONE // 8, FORGET_ONE + 1, (B, N), generator=g).to(TEST_DEVICE)
        add = torch.randint(-(2**23), 2**23 + 1, (B, N), generator=g).to(TEST_DEVICE)
        history.append((h, z, add))
        h, _, word = kernels.multiply_add(h, z, buf.begin_multiply(z), add)
        buf.end_multiply(word)
    buf.finish()
    assert buf.stack is not None and buf.stack.numel(), "60 multiplications of up to 3 bits drain at least once"
    for old, z, add in reversed(history):
        h, _, word = kernels.subtract_divide(h, add, z, buf.begin_divide())
        buf.end_divide(word)
        assert torch.equal(h, old)
    assert buf.is_empty()


@pytest.mark.parametrize(
    ("retain", "hint"), [(True, True), (True, False), (False, True)], ids=["retain", "growing", "evaluation"]
)
def test_kernels_drain_and_pop_as_the_buffer_does(kernels, retain, hint):
    """Drains and pops inside the kernels (``begin_kernel_multiply`` / ``begin_kernel_divide``) against the buffer's
    own ATen ops, step by step from the same operands: the same states and words, the same slots and packed words
    at the window's end, and back to the same empty buffer. Several kernel programs (more units than a block);
    ``growing``: no size hint, so the dense stack grows while the kernels write into it."""
    g = torch.Generator().manual_seed(7)
    device = torch.device(TEST_DEVICE)
    steps, shape = 150, (5, 300)  # 1500 units: two programs of BLOCK
    hint_steps = steps if hint else None
    ref, fused = (InformationBuffer(shape, device, 3, retain=retain, multiplications=hint_steps) for _ in range(2))
    h = h_ref = torch.randint(-(2**40), 2**40, shape, generator=g).to(device)
    history = []
    for _ in range(steps):
        z = torch.randint(FORGET_ONE // 8, FORGET_ONE + 1, shape, generator=g).to(device)
        add = torch.randint(-(2**23), 2**23 + 1, shape, generator=g).to(device)
        history.append((h, z, add))
        h_ref, word = reversible_multiply(h_ref, z, ref.begin_multiply(z))
        h_ref = h_ref + add
        ref.end_multiply(word)
        word, site = fused.begin_kernel_multiply()
        h, _, word = kernels.multiply_add(h, z, word, add, site)
        fused.end_multiply(word)
        assert torch.equal(h, h_ref) and torch.equal(fused.word, ref.word)
    sizes = ref.window_sizes()
    assert torch.equal(fused.window_sizes(), sizes)
    if not retain:
        return  # evaluation: the words drained the same; nothing was kept to reverse
    assert int(sizes[0]) > 2 * h.numel(), "150 multiplications of about 0.7 bits each drain every unit twice or more"
    ref.finish()
    fused.finish()
    assert all(torch.equal(a, b) for a, b in zip(ref.tensors(), fused.tensors()))
    for old, z, add in reversed(history):
        word, pop = fused.begin_kernel_divide()
        h, h_f, word = kernels.subtract_divide(h, add, z, word, pop)
        fused.end_kernel_divide(word)
        h_ref, word = reversible_divide(h_ref - add, z, ref.begin_divide())
        ref.end_divide(word)
        assert torch.equal(h, old) and torch.equal(h_ref, old) and torch.equal(fused.word, ref.word)
        assert torch.equal(h_f, to_float(old))
    assert fused.is_empty() and ref.is_empty()


def test_kernel_drain_and_pop_boundaries(kernels):
    """At the thresholds, by hand: a word of exactly ``z*·2^32`` drains, one below does not; after an undone
    multiplication a word below ``FLOOR`` pops where slots are left, ``FLOOR`` itself and an empty stack do not.
    ``z* = 2^R_Z`` multiplies by one, so the words pass the arithmetic unchanged."""
    device = torch.device(TEST_DEVICE)
    one = torch.full((1, 4), FORGET_ONE, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(one)
    at = FORGET_ONE << DRAIN_BITS
    word = torch.tensor([[at, at - 1, at + 5, 0]], device=device)
    stack = torch.full((3, 1, 4), -1, dtype=torch.int32, device=device)
    depth = torch.tensor([[0, 0, 2, 1]], device=device)
    _, _, out = kernels.multiply_add(zeros, one, word, zeros, DrainSite(stack, depth, last=2))
    assert out.tolist() == [[FORGET_ONE, at - 1, FORGET_ONE, 0]]  # shifted by 32 where drained, times one
    assert depth.tolist() == [[1, 0, 3, 1]]
    assert stack[0, 0, 0] == 0 and stack[2, 0, 2] == 5 and int((stack != -1).sum()) == 2  # only drains wrote

    slots = torch.tensor([0, -2, 7, 9], dtype=torch.int32, device=device)  # slot 0 unused, as after finish()
    top = torch.tensor([[1, 2, 3, 0]], device=device)
    start = torch.tensor([[0, 1, 3, 0]], device=device)
    word = torch.tensor([[FLOOR - 1, FLOOR, 5, 3]], device=device)
    _, _, back = kernels.subtract_divide(zeros, zeros, one, word, PopSite(slots, top, start))
    # the slot's 32 bits come back unsigned (-2 is 0xFFFFFFFE); units 2, 3: no slots left
    assert back.tolist() == [[((FLOOR - 1) << 32) | 0xFFFFFFFE, FLOOR, 5, 3]]
    assert top.tolist() == [[0, 2, 3, 0]]


@pytest.mark.compile
@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
def test_fused_backend_on_triton_kernels_rebuilds_every_state(kernels, cls):
    """The fused backend with its integer stages on the Triton kernels (as on CUDA): the stepwise harness of
    test_cells rebuilds every state of a 2-layer window bit for bit, and every multiplication ran a kernel."""
    cfg = dict(
        cls=cls,
        input_size=5,
        hidden=2 * N,
        layers=2,
        bits=3,
        dropout=0.3,
        input_dropout=0.3,
        dropconnect=0.5,
        T=21,
        batch=B,
        weight_scale=4.0,
        state_scale=1.0,
        seed=11,
    )
    rnn, x, hx = build(cfg)
    input_masks, hidden_masks = sample_masks(rnn, x, 5)
    backend = FusedBackend(StageCounter(), triton=True)
    with torch.no_grad():
        independent_roundtrip(rnn, x, hx, input_masks, hidden_masks, backend=backend)
    assert backend.stages.counter is not None
    calls = backend.stages.counter.calls
    multiplications = 2 * 21 * rnn.cells[0].multiplications_per_step
    assert calls["multiply_add_logged"] == calls["subtract_divide"] == multiplications, calls
