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
from lightning_revrnn.core.buffer import InformationBuffer
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
