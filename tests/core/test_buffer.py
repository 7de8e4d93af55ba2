"""The information buffer: per-unit drains, emptiness after reversal, and the paper's accounting.

Every unit drains on its own (its word is at least ``z*·2^32`` before a multiplication by ``z*``), decided on
the device; ``finish()`` compacts the slots with one host read per window. A plain reference of the rule on
Python ints (a host read at every multiplication) must give the same states, words and slots.
"""

from __future__ import annotations

import math
from typing import Protocol

import pytest
import torch
from torch import nn

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.core.backend import EAGER
from lightning_revrnn.core.buffer import FLOOR, WORD_BITS, InformationBuffer, stack_capacity
from lightning_revrnn.core.fixed_point import FORGET_ONE, forget_floor, reversible_multiply
from lightning_revrnn.core.forward import run_forward
from lightning_revrnn.core.gates import forget_scaled, round_forget
from lightning_revrnn.core.numerics import AutocastState
from lightning_revrnn.core.window import WindowPlan


class Multiplier(Protocol):
    """What ``_run`` needs: the buffer, or the plain reference of its drain rule."""

    def multiply(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


def _run(buf: Multiplier, h: torch.Tensor, zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Multiply through ``zs``; return ``h`` after each multiplication."""
    hs = []
    for z in zs:
        h = buf.multiply(h, z)
        hs.append(h)
    return hs


def _reverse(buf: InformationBuffer, h: torch.Tensor, zs: list[torch.Tensor]) -> torch.Tensor:
    for z in reversed(zs):
        h = buf.divide(h, z)
    return h


def _slots(buf: InformationBuffer) -> list[list[int]]:
    """Each unit's slots (row-major units, oldest first), from the finished buffer's stack and depths."""
    buf.finish()
    assert buf.stack is not None
    _, depth = _unpacked(buf)
    stack, out, at = buf.stack.tolist(), [], 1  # stack[0]: the unused element below the first slot
    for d in depth.flatten().tolist():
        out.append(stack[at : at + d])
        at += d
    assert buf.drains == max(len(stack) - 1, 0) and at == max(len(stack), 1)
    return out


def _unpacked(buf: InformationBuffer) -> tuple[torch.Tensor, torch.Tensor]:
    from lightning_revrnn.core.packing import unpack_units

    assert buf._packed is not None  # finished, reverse not started
    return unpack_units(buf._packed)


@pytest.mark.parametrize("k", [1, 3, None])
def test_many_multiplications_drain_and_reverse_to_empty(k: int | None) -> None:
    torch.manual_seed(0)
    buf = InformationBuffer((3, 5), torch.get_default_device(), k, retain=True)
    h0 = torch.randint(-(2**30), 2**30, (3, 5), dtype=torch.int64)
    zs = [round_forget(forget_scaled(torch.rand(3, 5) * 0.2, k), k)[0] for _ in range(200)]
    h = h0
    for z in zs:
        h = buf.multiply(h, z)
        assert int(buf.word.min()) >= 0 and int(buf.word.max()) < 2**WORD_BITS
    buf.finish()
    assert buf.stack is not None and buf.stack.dtype == torch.int32 and buf.stack.numel() > 15
    assert buf.syncs == 1  # one read for the whole forward
    assert torch.equal(_reverse(buf, h, zs), h0)
    assert buf.is_empty()


@pytest.mark.parametrize("k", [1, 2, 3, 5, None])
def test_worst_case_forgetting_stays_within_the_bounds(k: int | None) -> None:
    """Every multiplication at the smallest allowed z* (k bits each, the most a word can grow): the words
    stay in [0, 2^42), no unit's depth passes :func:`stack_capacity` (the dense stack's size), and every unit
    drains about once per 32 bits."""
    torch.manual_seed(1)
    B, n, M = 3, 4, 300
    bits = 10 if k is None else k
    buf = InformationBuffer((B, n), torch.get_default_device(), k, retain=True)
    h0 = torch.randint(-(2**40), 2**40, (B, n), dtype=torch.int64)
    zs = [torch.full((B, n), forget_floor(k), dtype=torch.int64) for _ in range(M)]
    h = h0
    for m, z in enumerate(zs, 1):
        h = buf.multiply(h, z)
        assert int(buf.word.min()) >= 0 and int(buf.word.max()) < 2**WORD_BITS
        assert int(buf._depth.max()) <= stack_capacity(m, k)
    assert buf.syncs == 0, "the forward decides on the device and reads nothing"
    slots = _slots(buf)
    assert all(len(s) >= (M * bits - WORD_BITS) // 32 for s in slots), [len(s) for s in slots]
    assert buf.syncs == 1
    assert torch.equal(_reverse(buf, h, zs), h0)
    assert buf.is_empty()


def test_a_window_of_known_length_sizes_its_dense_stack_once() -> None:
    """Told the window's multiplications, the buffer allocates the dense stack once, at the first possible
    drain, for all of them: it never grows (growing copies it, two copies alive at once); the same results."""
    torch.manual_seed(7)
    B, n, M, k = 2, 3, 120, 3
    zs = [torch.full((B, n), forget_floor(k), dtype=torch.int64) for _ in range(M)]
    h0 = torch.randint(-(2**30), 2**30, (B, n), dtype=torch.int64)
    sized = InformationBuffer((B, n), torch.get_default_device(), k, retain=True, multiplications=M)
    growing = InformationBuffer((B, n), torch.get_default_device(), k, retain=True)
    shapes = set()
    h, h_growing = h0, h0
    for z in zs:
        h, h_growing = sized.multiply(h, z), growing.multiply(h_growing, z)
        shapes.add(sized._dense.shape[0])
    assert shapes == {0, stack_capacity(M, k) + 1}
    assert torch.equal(h, h_growing) and _slots(sized) == _slots(growing)
    # finished, the buffer holds its compact tensors only: the dense stack's storage is released (not kept by a view)
    assert sized._dense.untyped_storage().nbytes() == 0 == growing._dense.untyped_storage().nbytes()


def test_drains_of_a_unit_do_not_depend_on_any_other_unit() -> None:
    """Units forgetting at very different rates, run as one batch and each alone (a 1×1 buffer). Pure integer
    ops, so bit-exactness is guaranteed: every unit's h, word and slots must be identical in both runs."""
    torch.manual_seed(2)
    B, n, M, k = 4, 3, 120, None
    h0 = torch.randint(-(2**30), 2**30, (B, n), dtype=torch.int64)
    lowest = torch.tensor([1, 64, 512, 1024]).view(B, 1)  # example b's z* ≥ lowest[b]: ~10, ~4, ~1, 0 bits
    zs = [torch.maximum(torch.randint(1, FORGET_ONE + 1, (B, n)), lowest) for _ in range(M)]

    batch = InformationBuffer((B, n), torch.get_default_device(), k, retain=True)
    hs_batch = _run(batch, h0, zs)
    batch_slots = _slots(batch)
    for b in range(B):
        for j in range(n):
            alone = InformationBuffer((1, 1), torch.get_default_device(), k, retain=True)
            unit_zs = [z[b : b + 1, j : j + 1] for z in zs]
            hs_alone = _run(alone, h0[b : b + 1, j : j + 1], unit_zs)
            assert all(torch.equal(hb[b, j], ha[0, 0]) for hb, ha in zip(hs_batch, hs_alone)), (b, j)
            assert _slots(alone) == [batch_slots[b * n + j]], (b, j)
            assert torch.equal(_unpacked(alone)[0][0, 0], _unpacked(batch)[0][b, j]), (b, j)
            assert torch.equal(_reverse(alone, hs_alone[-1], unit_zs), h0[b : b + 1, j : j + 1])
    depths = [len(s) for s in batch_slots]
    assert len(set(depths)) > 2, f"the setup must drain units at different rates: {depths}"
    assert torch.equal(_reverse(batch, hs_batch[-1], zs), h0) and batch.is_empty()


def test_evaluation_buffer_keeps_no_slots_but_computes_the_same() -> None:
    """Without retain the drains happen alike (same h, same words) but nothing is kept or read."""
    torch.manual_seed(1)
    zs = [torch.full((2, 4), 1, dtype=torch.int64) for _ in range(30)]  # 10 bits per multiplication
    h0 = torch.randint(-(2**30), 2**30, (2, 4), dtype=torch.int64)
    results = []
    for retain in (True, False):
        buf = InformationBuffer((2, 4), torch.get_default_device(), None, retain=retain)
        results.append((_run(buf, h0, zs)[-1], buf))
    (h_train, b_train), (h_eval, b_eval) = results
    assert torch.equal(h_train, h_eval) and torch.equal(b_train.word, b_eval.word)
    assert _slots(b_train) and b_train.syncs == 1
    b_eval.finish()
    assert b_eval.stack is None and b_eval.syncs == 0
    with pytest.raises(RuntimeError, match="retain=True"):
        _reverse(b_eval, h_eval, zs)


def test_a_finished_forward_refuses_more_multiplications() -> None:
    buf = InformationBuffer((1, 2), torch.get_default_device(), 3, retain=True)
    buf.multiply(torch.ones(1, 2, dtype=torch.int64), torch.full((1, 2), 600))
    buf.finish()
    with pytest.raises(RuntimeError, match="forward is finished"):
        buf.multiply(torch.ones(1, 2, dtype=torch.int64), torch.full((1, 2), 600))


# ------------------------------------------------------------------ device decisions vs the plain rule
class ReferenceDrains:
    """The drain rule written plainly on Python ints, read on the host at every multiplication.

    Before a multiplication by ``z*``, every unit whose word is at least ``z*·2^32`` moves its low 32 bits onto
    its own stack (``slots[unit]``, oldest first, as int32) and keeps the rest shifted down.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.word = torch.zeros(shape, dtype=torch.int64)
        self.slots: list[list[int]] = [[] for _ in range(shape[0] * shape[1])]

    def multiply(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        words, zs = self.word.flatten().tolist(), z.flatten().tolist()
        for u, (w, zv) in enumerate(zip(words, zs)):
            if w >= zv << 32:
                self.slots[u].append((w + 2**31) % 2**32 - 2**31)  # the low 32 bits as an int32
                words[u] = w >> 32
        h, self.word = reversible_multiply(h, z, torch.tensor(words).view(self.word.shape))
        return h


def _forget_values(kind: str, B: int, n: int, M: int, k: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(h0, z*s)`` for M multiplications: "partial" (example b forgets at its own rate, units at random
    within it), "all" (h* = -1 and the smallest z* everywhere: every unit drains at the same
    multiplications), "none" (z* = 2^R_Z: nothing forgotten, the words stay 0 while the host bound, blind to
    that, has the device decide)."""
    floor = forget_floor(k)
    if kind == "all":
        return torch.full((B, n), -1, dtype=torch.int64), [torch.full((B, n), floor) for _ in range(M)]
    h0 = torch.randint(-(2**30), 2**30, (B, n), dtype=torch.int64)
    if kind == "none":
        return h0, [torch.full((B, n), FORGET_ONE) for _ in range(M)]
    lowest = torch.maximum(torch.logspace(0, 10, B, base=2).round().long(), torch.tensor(floor)).view(B, 1)
    return h0, [torch.maximum(torch.randint(floor, FORGET_ONE + 1, (B, n)), lowest) for _ in range(M)]


@pytest.mark.parametrize("kind", ["partial", "all", "none"])
@pytest.mark.parametrize(("k", "B"), [(1, 1), (3, 5), (None, 7), (2, 300)])
def test_device_decided_drains_equal_the_plain_rule(kind: str, k: int | None, B: int) -> None:
    """h after every multiplication, the words, and after finish() every unit's slots equal the reference's
    bit for bit; one sync; exact reversal."""
    torch.manual_seed(3)
    n, M = 3, 100
    h0, zs = _forget_values(kind, B, n, M, k)
    buf, ref = InformationBuffer((B, n), torch.get_default_device(), k, retain=True), ReferenceDrains((B, n))
    h, h_ref = h0, h0
    for m, z in enumerate(zs):
        h, h_ref = buf.multiply(h, z), ref.multiply(h_ref, z)
        assert torch.equal(h, h_ref), m
    assert torch.equal(buf.word, ref.word)
    assert buf.syncs == 0
    assert _slots(buf) == ref.slots
    assert buf.syncs == 1
    assert torch.equal(_unpacked(buf)[0], ref.word)
    depths = {len(s) for s in ref.slots}
    if kind == "partial" and B > 1:
        assert len(depths) > 1, "the setup must drain units at different rates"
    if kind == "all":
        assert len(depths) == 1 and depths != {0}
    if kind == "none":
        assert depths == {0} and buf.stats(0).drains == 0
    assert torch.equal(_reverse(buf, h, zs), h0) and buf.is_empty()
    assert buf.syncs == 1, "the reverse sweep reads nothing"


_HOST_READS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero", "numpy", "cpu")


def _forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a host read of a device value")

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, read)


@pytest.mark.parametrize("retain", [True, False], ids=["train", "eval"])
def test_forward_and_reverse_read_nothing_from_the_device(monkeypatch: pytest.MonkeyPatch, retain: bool) -> None:
    """Every Tensor method that hands a device value to the host raises during the multiplications (units
    draining at different rates) and, in training, during the whole reverse; only finish() reads, and in
    evaluation not even it."""
    torch.manual_seed(4)
    B, n, k = 6, 4, None
    h0, zs = _forget_values("partial", B, n, 60, k)
    buf, ref = InformationBuffer((B, n), torch.get_default_device(), k, retain=retain), ReferenceDrains((B, n))
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        h = _run(buf, h0, zs)[-1]
        if retain:
            with pytest.raises(AssertionError, match="host read"):  # the patch does catch the buffer's read
                buf.finish()
        else:
            buf.finish()  # nothing kept, nothing to read
    assert torch.equal(h, _run(ref, h0, zs)[-1]) and torch.equal(buf.word, ref.word)
    assert any(ref.slots), "the setup must drain"
    buf.finish()
    assert buf.syncs == (1 if retain else 0)
    if retain:
        with monkeypatch.context() as patch:
            _forbid_host_reads(patch)
            back = _reverse(buf, h, zs)
        assert torch.equal(back, h0) and buf.is_empty()


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
def test_module_forward_reads_each_buffer_once_per_window(cls: type) -> None:
    """A two-layer window long enough for many check points: one read per layer in training (the sweep
    finishes each buffer), none in evaluation; the reverse sweep still empties every buffer."""
    torch.manual_seed(5)
    rnn = cls(3, 8, num_layers=2, max_forget_bits=3)
    x = torch.randn(48, 2, 3, requires_grad=True)
    out, _ = rnn(x)
    buffers = rnn.last_window.buffers
    assert [b.syncs for b in buffers] == [1, 1] and all(b.stack is not None for b in buffers)
    assert rnn.memory_stats().drains > 0
    out.sum().backward()
    assert all(b.is_empty() and b.syncs == 1 for b in buffers)
    window = WindowPlan.build(list(rnn.cells), EAGER, [None] * 2, [None] * 2, False, AutocastState.capture(x.device))
    state = [[torch.zeros(2, c.half_size, dtype=torch.int64) for _ in range(c.state_halves)] for c in rnn.cells]
    with torch.no_grad():
        result = run_forward(window, x, state, [[s.float() for s in st] for st in state], [])
    assert [b.syncs for b in result.buffers] == [0, 0]
    assert all(b.multiplications == 48 * c.multiplications_per_step for b, c in zip(result.buffers, rnn.cells))


# ----------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("second_forgets", [False, True], ids=["one-example-drains", "both-drain"])
def test_accounting_by_hand_with_drains(second_forgets: bool) -> None:
    """B=2, H/2=3, no limit, h* = -1 everywhere, M=10 multiplications.

    Example 0 has z* = 1 (10 bits forgotten per unit and multiplication): each multiplication appends
    ``-1 mod 2^10 = 1023`` to its words and leaves h* = -1, so a word is all ones. A unit drains before a
    multiplication when its word is at least ``z*·2^32 = 2^32``: before multiplication 4 (2^40 - 1: drains to
    2^8 - 1) and 7 (2^38 - 1 after 5 and 6: drains to 2^6 - 1); the final word is 2^36 - 1. Example 1 has
    z* = 1024 (nothing forgotten: its words stay 0) or, with ``second_forgets``, z* = 1 too. Each slot is the
    low 32 bits, all ones (-1 as an int32).

    used: the slots (32 bits each, after one unused element) and the stream of 63-bit int64 words holding 6
    headers (6 + 2 bits: the length and the depth, up to 2) and each word's 35 bits below its leading one."""
    B, n, M = 2, 3, 10
    buf = InformationBuffer((B, n), torch.get_default_device(), None, retain=True)
    z = torch.tensor([[1] * n, [1 if second_forgets else FORGET_ONE] * n])
    h = torch.full((B, n), -1, dtype=torch.int64)
    for _ in range(M):
        h = buf.multiply(h, z)
    assert torch.equal(h, torch.full((B, n), -1, dtype=torch.int64))
    drained = B if second_forgets else 1
    assert torch.equal(buf.word[:drained], torch.full((drained, n), 2**36 - 1))
    slots = _slots(buf)
    assert slots == [[-1] * 2] * (drained * n) + [[]] * ((B - drained) * n)
    assert buf.syncs == 1
    stack_bits = (2 * drained * n + 1) * 32
    stream_bits = 64 * -(-(B * n * (6 + 2) + drained * n * 35) // 63)
    assert (stack_bits, stream_bits) == ((416, 320) if second_forgets else (224, 192))
    stats = buf.stats(normal_bits=1000)
    assert stats.used_bits == stack_bits + stream_bits
    assert sum(t.numel() * t.element_size() * 8 for t in buf.tensors()) == stats.used_bits
    assert stats.optimal == 10 * n * M * drained  # Σ -log2(z*/1024)
    assert stats.drains == 2 * drained * n and stats.multiplications == M
    assert torch.equal(_reverse(buf, h, [z] * M), torch.full((B, n), -1, dtype=torch.int64)) and buf.is_empty()


def test_a_drained_unit_rests_at_or_above_the_floor() -> None:
    """What the reverse sweep's decision rests on: after its first drain a unit's word never falls below
    2^R_Z again in the forward (a unit with slots below the floor had drained)."""
    torch.manual_seed(6)
    B, n, k = 8, 16, 3
    h0, zs = _forget_values("partial", B, n, 400, k)
    buf = InformationBuffer((B, n), torch.get_default_device(), k, retain=True)
    h = h0
    for z in zs:
        h = buf.multiply(h, z)
        drained = buf._depth > 0
        assert bool((buf.word[drained] >= FLOOR).all())
    assert bool((buf._depth > 0).any())
    assert torch.equal(_reverse(buf, h, zs), h0)


def test_accounting_by_hand_single_unit() -> None:
    """RevGRU, H=2 (one unit per half), batch 1, T=1, zero weights, bias 0: z = 7/8·σ(0) + 1/8 = 0.5625."""
    rnn = RevGRU(1, 2, max_forget_bits=3)
    for p in rnn.parameters():
        nn.init.zeros_(p)
    x = torch.zeros(1, 1, 1, requires_grad=True)
    rnn(x)
    stats = rnn.memory_stats()
    zq = round(0.5625 * FORGET_ONE)
    assert zq == 576
    assert stats.normal_bits == 32 * 1 * 1 * 2  # 32 · T · B · H
    assert stats.optimal == pytest.approx(2 * math.log2(FORGET_ONE / zq))  # two multiplications
    # h* stays 0 (zero input and weights), so the multiplications push no bit: the packed word is its 6-bit
    # header alone, in one int64 of the stream
    assert stats.used_bits == 64
    assert stats.actual_ratio == 1.0
    assert stats.multiplications == 2 and stats.drains == 0
    assert stats.layers[0].used_bits == stats.used_bits


def _bias_for(z_star: int, k: int | None) -> float:
    """A gate bias whose (limited, rounded) forget value is exactly ``z_star`` with zero weights."""
    if z_star == FORGET_ONE:
        return 20.0  # σ(20) is 1.0 in float32
    floor = 0.0 if k is None else 2.0**-k
    s = (z_star / FORGET_ONE - floor) / (1.0 - floor)
    return -20.0 if s == 0 else math.log(s / (1.0 - s))


def test_accounting_by_hand_gru_chosen_forget_values() -> None:
    """RevGRU, B=1, H=4 (two units per half), no limit, zero weights, T=3; z* chosen per unit:
    group 1 (512, 128), group 2 (256, 1024). Σ -log2(z*/1024) = 1 + 3 + 2 + 0 = 6 bits per step, 18 in all.
    Six multiplications: no drain; h* stays 0 (zero
    weights: g = 0), so the words stay 0 and pack to their 6-bit headers, one int64 of the stream: used = 64."""
    k, n = None, 2
    rnn = RevGRU(1, 2 * n, max_forget_bits=k)
    with torch.no_grad():
        for p in rnn.parameters():
            p.zero_()
        rows = rnn.cell_list[0].hidden_rows
        for g, zs in enumerate([(512, 128), (256, 1024)]):
            rnn.cell_list[0].bias[g * rows : g * rows + n] = torch.tensor([_bias_for(z, k) for z in zs])
    rnn(torch.zeros(3, 1, 1, requires_grad=True))
    stats = rnn.memory_stats()
    assert stats.optimal == 18.0
    assert stats.used_bits == 64 and stats.drains == 0 and stats.multiplications == 6
    assert stats.normal_bits == 32 * 3 * 1 * 4
    assert stats.efficiency == 18 / 64 and stats.actual_ratio == 384 / 64


def test_accounting_by_hand_lstm_chosen_forget_values() -> None:
    """RevLSTM, B=1, H=4, k=3, zero weights, T=2; forget values chosen per unit: group 1 f* (1024, 512),
    p* (256, 128); group 2 f* (128, 1024), p* (512, 512). Bits per step: (0+1) + (2+3) + (3+0) + (1+1) = 11,
    22 in all. Eight multiplications (c1, h1, c2, h2 per step) of at most 3 bits: no drain; c* and h* stay 0
    (g = 0), so the words pack to their 6-bit headers, one int64: used = 64;
    normal counts h and c: 32·T·B·H·2 = 512."""
    k, n = 3, 2
    rnn = RevLSTM(1, 2 * n, max_forget_bits=k)
    with torch.no_grad():
        for p in rnn.parameters():
            p.zero_()
        rows = rnn.cell_list[0].hidden_rows  # per group: f, i, o, p, g (n rows each)
        for g, (fs, ps) in enumerate([((1024, 512), (256, 128)), ((128, 1024), (512, 512))]):
            base = g * rows
            rnn.cell_list[0].bias[base : base + n] = torch.tensor([_bias_for(z, k) for z in fs])
            rnn.cell_list[0].bias[base + 3 * n : base + 4 * n] = torch.tensor([_bias_for(z, k) for z in ps])
    rnn(torch.zeros(2, 1, 1, requires_grad=True))
    stats = rnn.memory_stats()
    assert stats.optimal == 22.0
    assert stats.used_bits == 64 and stats.drains == 0 and stats.multiplications == 8
    assert stats.normal_bits == 512
    assert stats.efficiency == 22 / 64


def test_accounting_totals_are_the_sum_of_the_layers() -> None:
    torch.manual_seed(0)
    rnn = RevLSTM(4, [6, 4], num_layers=2, max_forget_bits=None)
    with torch.no_grad():
        for c in rnn.cell_list:
            c.bias.fill_(-6.0)  # forget gates near 0: ~10 bits per multiplication, forcing drains
    T, B = 30, 3
    rnn(torch.randn(T, B, 4, requires_grad=True))
    stats = rnn.memory_stats()
    assert stats.drains > 0
    for layer, (cell, s) in enumerate(zip(rnn.cell_list, stats.layers)):
        assert s.normal_bits == 32 * T * B * cell.hidden_size * 2, layer  # h and c
        assert s.multiplications == 4 * T
        assert 0 < s.optimal <= 4 * T * B * cell.half_size * 10  # at most 10 bits per multiplication
        # Every unit forgets ~8.4 bits per multiplication (z* ≈ 3), so the buffer is nearly optimal: every slot
        # is full; the extra is the final words' headers. It may hold slightly less than Σ -log2 z*, which
        # counts random low bits: a word starts at 0, and a multiplication pushing zeros into it keeps it 0.
        assert 0.9 < s.efficiency < 1.1
    for key in ("normal_bits", "used_bits", "drains", "multiplications"):
        assert getattr(stats, key) == sum(getattr(s, key) for s in stats.layers), key
    assert stats.efficiency == pytest.approx(stats.optimal / stats.used_bits)
