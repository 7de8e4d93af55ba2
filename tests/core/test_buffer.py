"""The information buffer: growth, per-example drains, emptiness after reversal, and the paper's accounting.

The drains are decided on the device and compacted by ``finish()`` with one host read per window; a plain
reference of the drain rule (a host read at every check point) must give the same states, words, planes
and drain records.
"""

from __future__ import annotations

import math
from typing import Protocol

import pytest
import torch
from torch import nn

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.core.backend import EAGER
from lightning_revrnn.core.buffer import InformationBuffer, check_period, row_index_dtype
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


@pytest.mark.parametrize("k", [1, 3, None])
def test_many_multiplications_drain_and_reverse_to_empty(k: int | None) -> None:
    torch.manual_seed(0)
    buf = InformationBuffer((3, 5), torch.get_default_device(), k, retain=True)
    h0 = torch.randint(-(2**30), 2**30, (3, 5), dtype=torch.int64)
    zs = [round_forget(forget_scaled(torch.rand(3, 5) * 0.2, k), k)[0] for _ in range(200)]
    h = _run(buf, h0, zs)[-1]
    assert buf.planes, "200 multiplications forgetting >2 bits each must drain"
    assert all(p.dtype == torch.int32 and p.shape[1] == 5 for p in buf.planes)
    assert int(buf.word.min()) >= 0 and int(buf.word.max()) < 2**63
    assert buf.syncs == 1  # reading the records finished the forward: one read for all its check points
    assert torch.equal(_reverse(buf, h, zs), h0)
    assert buf.is_empty()


@pytest.mark.parametrize("k", [1, 2, 3, 5, None])
def test_worst_case_forgetting_never_overflows_a_word(k: int | None) -> None:
    """Every multiplication at the smallest allowed z* (k bits each, the most a word can grow): the words
    never wrap (each stays non-negative; a wrapped word would break the exact reversal) and every example
    drains repeatedly."""
    torch.manual_seed(1)
    B, n, M = 3, 4, 300
    buf = InformationBuffer((B, n), torch.get_default_device(), k, retain=True)
    h0 = torch.randint(-(2**40), 2**40, (B, n), dtype=torch.int64)
    zs = [torch.full((B, n), forget_floor(k), dtype=torch.int64) for _ in range(M)]
    h = h0
    for z in zs:
        h = buf.multiply(h, z)
        assert int(buf.word.min()) >= 0
    assert buf.syncs == 0 and buf.pending, "the forward decides on the device and reads nothing"
    assert sum(buf.drained_counts) >= B * (M * (10 if k is None else k) // 32 - 2)
    assert buf.syncs == 1
    assert torch.equal(_reverse(buf, h, zs), h0)
    assert buf.is_empty()


def test_drain_decisions_of_an_example_do_not_depend_on_its_batchmates() -> None:
    """Four examples forgetting at very different rates, run as one batch and each alone. Pure integer
    ops, so bit-exactness is guaranteed: every example's h, words, drain schedule and drained plane rows
    must be identical in both runs (a drain decided over the whole batch would fail this)."""
    torch.manual_seed(2)
    B, n, M, k = 4, 3, 120, None
    h0 = torch.randint(-(2**30), 2**30, (B, n), dtype=torch.int64)
    lowest = torch.tensor([1, 64, 512, 1024]).view(B, 1)  # example b's z* ≥ lowest[b]: ~10, ~4, ~1, 0 bits
    zs = [torch.maximum(torch.randint(1, FORGET_ONE + 1, (B, n)), lowest) for _ in range(M)]

    batch = InformationBuffer((B, n), torch.get_default_device(), k, retain=True)
    hs_batch = _run(batch, h0, zs)
    for b in range(B):
        alone = InformationBuffer((1, n), torch.get_default_device(), k, retain=True)
        hs_alone = _run(alone, h0[b : b + 1], [z[b : b + 1] for z in zs])
        for t, (hb, ha) in enumerate(zip(hs_batch, hs_alone)):
            assert torch.equal(hb[b : b + 1], ha), (b, t)
        assert torch.equal(batch.word[b : b + 1], alone.word), b
        schedule, rows = [], []
        for before, idx, plane in zip(batch.drained_before, batch.drained_rows, batch.planes):
            members = list(range(B)) if idx is None else idx.tolist()
            if b in members:
                schedule.append(before)
                rows.append(plane[members.index(b)])
        assert schedule == alone.drained_before, b
        assert all(torch.equal(r, p[0]) for r, p in zip(rows, alone.planes)), b
        assert torch.equal(_reverse(alone, hs_alone[-1], [z[b : b + 1] for z in zs]), h0[b : b + 1])
    assert sum(1 for idx in batch.drained_rows if idx is not None) > 0, "some drains must take part of the batch"
    assert all(idx.dtype == torch.uint8 for idx in batch.drained_rows if idx is not None)  # batch ≤ 256
    dtypes = (row_index_dtype(256), row_index_dtype(257), row_index_dtype(2**16))
    assert dtypes == (torch.uint8, torch.int16, torch.int32)
    assert torch.equal(_reverse(batch, hs_batch[-1], zs), h0) and batch.is_empty()


def test_evaluation_buffer_keeps_no_planes_but_computes_the_same() -> None:
    """Without retain the drains happen alike (same h, same words) but nothing is recorded or read."""
    torch.manual_seed(1)
    zs = [torch.full((2, 4), 1, dtype=torch.int64) for _ in range(30)]  # 10 bits per multiplication
    h0 = torch.randint(-(2**30), 2**30, (2, 4), dtype=torch.int64)
    results = []
    for retain in (True, False):
        buf = InformationBuffer((2, 4), torch.get_default_device(), None, retain=retain)
        results.append((_run(buf, h0, zs)[-1], buf))
    (h_train, b_train), (h_eval, b_eval) = results
    assert torch.equal(h_train, h_eval) and torch.equal(b_train.word, b_eval.word)
    assert b_train.planes and b_train.syncs == 1
    b_eval.finish()
    assert not b_eval.pending and not b_eval.planes and not b_eval.drained_before and b_eval.syncs == 0
    with pytest.raises(RuntimeError, match="retain=True"):
        _reverse(b_eval, h_eval, zs)


# ------------------------------------------------------------------ device decisions vs the plain rule
class ReferenceDrains:
    """The drain rule written plainly, with a host read at every check point (as the buffer once did).

    Before multiplication ``m`` with ``m % check_period(k) == 0``, every example whose largest word has more
    than 32 bits moves the low 32 bits of its words into a plane row (stored as ``low - 2^31`` in int32) and
    keeps the rest shifted down. ``records``: ``(m, drained rows, plane)`` for each check point where some
    example drained.
    """

    def __init__(self, shape: tuple[int, int], k: int | None) -> None:
        self.word = torch.zeros(shape, dtype=torch.int64)
        self.period = check_period(k)
        self.multiplications = 0
        self.records: list[tuple[int, list[int], torch.Tensor]] = []

    def multiply(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.multiplications % self.period == 0:
            largest = self.word.amax(1).tolist()
            rows = [b for b, v in enumerate(largest) if v.bit_length() > 32]
            if rows:
                idx = torch.tensor(rows)
                words = self.word[idx]
                self.records.append((self.multiplications, rows, ((words % 2**32) - 2**31).to(torch.int32)))
                self.word = self.word.clone()
                self.word[idx] = words // 2**32
        h, self.word = reversible_multiply(h, z, self.word)
        self.multiplications += 1
        return h


def _forget_values(kind: str, B: int, n: int, M: int, k: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(h0, z*s)`` for M multiplications: "partial" (example b forgets at its own rate, so drains take
    part of the batch), "all" (h* = -1 and the smallest z* everywhere: every word is 2^(m·k) - 1, so every
    example drains at the same check points), "none" (z* = 2^R_Z: nothing forgotten, the words stay 0 while
    the host bound, blind to that, sends check points to the device)."""
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
    """h after every multiplication, the words, and after finish() the drain records (check point, rows,
    counts, row index dtype) and planes equal the reference's bit for bit; one sync; exact reversal."""
    torch.manual_seed(3)
    n, M = 3, 12 * check_period(k)
    h0, zs = _forget_values(kind, B, n, M, k)
    buf, ref = InformationBuffer((B, n), torch.get_default_device(), k, retain=True), ReferenceDrains((B, n), k)
    h, h_ref = h0, h0
    for m, z in enumerate(zs):
        h, h_ref = buf.multiply(h, z), ref.multiply(h_ref, z)
        assert torch.equal(h, h_ref), m
    assert torch.equal(buf.word, ref.word)
    assert buf.syncs == 0 and len(buf.pending) >= 10, "check points past the host bound run on the device"
    buf.finish()
    assert buf.syncs == 1 and not buf.pending
    assert buf.drained_before == [m for m, _, _ in ref.records]
    assert buf.drained_counts == [len(rows) for _, rows, _ in ref.records]
    for (_, rows, plane), got_rows, got_plane in zip(ref.records, buf.drained_rows, buf.planes, strict=True):
        if len(rows) == B:
            assert got_rows is None
        else:
            assert got_rows is not None and got_rows.dtype == row_index_dtype(B) and got_rows.tolist() == rows
        assert got_plane.dtype == torch.int32 and torch.equal(got_plane, plane)
    partial = [len(rows) < B for _, rows, _ in ref.records]
    if kind == "partial" and B > 1:
        assert any(partial), "the setup must drain part of the batch"
    if kind == "all":
        assert ref.records and not any(partial)
    if kind == "none":
        assert not ref.records and buf.stats(0).drains == 0
    assert buf.syncs == 1, "reading the finished records reads the device no more"
    assert torch.equal(_reverse(buf, h, zs), h0) and buf.is_empty()


_HOST_READS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero", "numpy", "cpu")


def _forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a host read of a device value")

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, read)


@pytest.mark.parametrize("retain", [True, False], ids=["train", "eval"])
def test_forward_reads_nothing_from_the_device(monkeypatch: pytest.MonkeyPatch, retain: bool) -> None:
    """Every Tensor method that hands a device value to the host raises during the multiplications
    (partial drains at many check points); only finish() reads, and in evaluation not even it."""
    torch.manual_seed(4)
    B, n, k = 6, 4, None
    h0, zs = _forget_values("partial", B, n, 60, k)
    buf, ref = InformationBuffer((B, n), torch.get_default_device(), k, retain=retain), ReferenceDrains((B, n), k)
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        h = _run(buf, h0, zs)[-1]
        if retain:
            with pytest.raises(AssertionError, match="host read"):  # the patch does catch the buffer's read
                buf.finish()
        else:
            buf.finish()  # nothing recorded, nothing to read
    assert torch.equal(h, _run(ref, h0, zs)[-1]) and torch.equal(buf.word, ref.word)
    assert ref.records, "the setup must drain"
    buf.finish()
    assert buf.syncs == (1 if retain else 0)
    assert len(buf.drained_before) == (len(ref.records) if retain else 0)


@pytest.mark.parametrize("cls", [RevGRU, RevLSTM], ids=lambda c: c.__name__)
def test_module_forward_reads_each_buffer_once_per_window(cls: type) -> None:
    """A two-layer window long enough for many check points: one read per layer in training (the sweep
    finishes each buffer), none in evaluation; the reverse sweep still empties every buffer."""
    torch.manual_seed(5)
    rnn = cls(3, 8, num_layers=2, max_forget_bits=3)
    x = torch.randn(48, 2, 3, requires_grad=True)
    out, _ = rnn(x)
    buffers = rnn.last_window.buffers
    assert [b.syncs for b in buffers] == [1, 1] and not any(b.pending for b in buffers)
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
    """B=2, H/2=3, no limit (period 3), h* = -1 everywhere, M=10 multiplications.

    Example 0 has z* = 1 (10 bits forgotten per unit and multiplication): each multiplication appends
    ``-1 mod 2^10 = 1023`` to its words and leaves h* = -1, so its words are ``2^(10m) - 1`` (10m bits).
    Example 1 has z* = 1024 (nothing forgotten: its words stay 0) or, with ``second_forgets``, z* = 1 too.
    The host bound grows 10 bits per multiplication: at check point m=3 it is 30 ≤ 32 (skipped on the
    host); at m=6, 60 > 32: decided on the device, example 0 has 60 bits and drains (word 2^28 - 1); the
    bound is now 32, so m=9 runs on the device too: 58 bits, drains again. finish() reads both check points
    at once (one sync). Each drained plane row is the low 32 bits, all ones."""
    B, n, M = 2, 3, 10
    buf = InformationBuffer((B, n), torch.get_default_device(), None, retain=True)
    z = torch.tensor([[1] * n, [1 if second_forgets else FORGET_ONE] * n])
    h = torch.full((B, n), -1, dtype=torch.int64)
    for _ in range(M):
        h = buf.multiply(h, z)
    assert torch.equal(h, torch.full((B, n), -1, dtype=torch.int64))
    assert buf.syncs == 0 and [p.before for p in buf.pending] == [6, 9]
    buf.finish()
    assert buf.syncs == 1 and not buf.pending and buf.drained_before == [6, 9]
    drained = B if second_forgets else 1
    assert buf.drained_counts == [drained, drained]
    assert all(p.shape == (drained, n) and bool((p == 2**31 - 1).all()) for p in buf.planes)  # 2^32-1 - 2^31
    assert torch.equal(buf.word[0], torch.full((n,), 2**36 - 1))  # 2^58-1 drained to 2^26-1, then ×2^10 + 1023
    stats = buf.stats(normal_bits=1000)
    planes = 2 * drained * n * 32  # two drains, 32 bits per unit of each drained example
    indices = 0 if second_forgets else 2 * 8  # one uint8 row index per partial drain (batch ≤ 256)
    words = B * n * 64
    assert stats.used_bits == planes + indices + words + M  # + one flag bit per multiplication
    assert stats.used_bits == (778 if second_forgets else 602)
    assert stats.optimal == 10 * n * M * (2 if second_forgets else 1)  # Σ -log2(z*/1024)
    assert stats.drains == 2 * drained and stats.multiplications == M
    # The window's end packs the final words: 2^36 - 1 takes 5 bytes, a zero word none, plus a count byte each.
    size = buf.packed_size()
    assert size.tolist() == [5 * n * drained]
    buf.pack(int(size))
    packed = 8 * (B * n + 5 * n * drained)
    assert buf.stats(normal_bits=1000).used_bits == planes + indices + packed + M == (682 if second_forgets else 386)
    assert sum(t.numel() * t.element_size() * 8 for t in buf.tensors()) == planes + indices + packed
    assert torch.equal(_reverse(buf, h, [z] * M), torch.full((B, n), -1, dtype=torch.int64)) and buf.is_empty()


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
    # h* stays 0 (zero input and weights), so the multiplications push no bit: the packed word is its count
    # byte alone, plus one flag bit per multiplication
    assert stats.used_bits == 8 + 2
    assert stats.actual_ratio == pytest.approx(64 / 10)
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
    Six multiplications stay below the first look (bound 30 at check point 3), so: no drain; h* stays 0 (zero
    weights: g = 0), so the words stay 0 and pack to their count bytes: used = 2 × 8 + 6 flags = 22."""
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
    assert stats.used_bits == 22 and stats.drains == 0 and stats.multiplications == 6
    assert stats.normal_bits == 32 * 3 * 1 * 4
    assert stats.efficiency == 18 / 22 and stats.actual_ratio == 384 / 22


def test_accounting_by_hand_lstm_chosen_forget_values() -> None:
    """RevLSTM, B=1, H=4, k=3, zero weights, T=2; forget values chosen per unit: group 1 f* (1024, 512),
    p* (256, 128); group 2 f* (128, 1024), p* (512, 512). Bits per step: (0+1) + (2+3) + (3+0) + (1+1) = 11,
    22 in all. Eight multiplications (c1, h1, c2, h2 per step) before the second check point (period 8):
    no drain; c* and h* stay 0 (g = 0), so the words pack to their count bytes: used = 2 × 8 + 8 flags = 24;
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
    assert stats.used_bits == 24 and stats.drains == 0 and stats.multiplications == 8
    assert stats.normal_bits == 512
    assert stats.efficiency == 22 / 24


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
        # Every unit forgets ~8.4 bits per multiplication (z* ≈ 3), so the buffer is nearly optimal: every
        # plane row is full (an example drains only past 32 bits); the extra is mostly the final words.
        assert 0.85 < s.efficiency <= 1.0
    for key in ("normal_bits", "used_bits", "drains", "multiplications"):
        assert getattr(stats, key) == sum(getattr(s, key) for s in stats.layers), key
    assert stats.efficiency == pytest.approx(stats.optimal / stats.used_bits)
