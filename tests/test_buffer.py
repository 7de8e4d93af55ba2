"""The information buffer: growth, drains, emptiness after reversal, and the paper's accounting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.buffer import DRAIN_BITS, InformationBuffer
from lightning_revrnn.fixed_point import FORGET_ONE, limit_forget, quantize_forget


@pytest.mark.parametrize("k", [1, 3, None])
def test_many_multiplications_drain_and_reverse_to_empty(k: int | None) -> None:
    torch.manual_seed(0)
    buf = InformationBuffer((3, 5), torch.device("cpu"), k, retain=True)
    h0 = torch.randint(-(2**30), 2**30, (3, 5), dtype=torch.int64)
    zs = [quantize_forget(limit_forget(torch.rand(3, 5) * 0.2, k), k)[0] for _ in range(200)]
    h = h0
    for z in zs:
        h = buf.multiply(h, z)
    assert buf.planes, "200 multiplications forgetting >2 bits each must drain"
    assert all(p.dtype == torch.int32 for p in buf.planes)
    assert int(buf.word.max()) < 2**63
    for z in reversed(zs):
        h = buf.divide(h, z)
    assert torch.equal(h, h0)
    assert buf.is_empty()


def test_evaluation_buffer_keeps_no_planes_but_computes_the_same() -> None:
    torch.manual_seed(1)
    zs = [torch.full((2, 4), 1, dtype=torch.int64) for _ in range(30)]  # 10 bits per multiplication
    h0 = torch.randint(-(2**30), 2**30, (2, 4), dtype=torch.int64)
    results = []
    for retain in (True, False):
        buf = InformationBuffer((2, 4), torch.device("cpu"), None, retain=retain)
        h = h0
        for z in zs:
            h = buf.multiply(h, z)
        results.append((h, buf))
    (h_train, b_train), (h_eval, b_eval) = results
    assert torch.equal(h_train, h_eval) and torch.equal(b_train.word, b_eval.word)
    assert b_train.planes and not b_eval.planes
    assert len(b_train.drained_before) == len(b_eval.drained_before)


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
    assert stats["normal_bits"] == 32 * 1 * 1 * 2  # 32 · T · B · H
    assert stats["optimal_bits"] == pytest.approx(2 * math.log2(FORGET_ONE / zq))  # two multiplications
    assert stats["used_bits"] == 64 + 2  # one 64-bit word, one flag bit per multiplication
    assert stats["actual_ratio"] == pytest.approx(64 / 66)
    assert stats["multiplications"] == 2 and stats["drains"] == 0
    assert stats["layers"][0]["used_bits"] == stats["used_bits"]


def test_accounting_counts_planes_and_lstm_cell_states() -> None:
    torch.manual_seed(0)
    rnn = RevLSTM(4, [6, 4], num_layers=2, max_forget_bits=None)
    with torch.no_grad():
        for c in rnn.cells:
            c.bias.fill_(-6.0)  # forget gates near 0: ~10 bits per multiplication, forcing drains
    T, B = 30, 3
    out, _ = rnn(torch.randn(T, B, 4, requires_grad=True))  # the graph keeps last_window alive
    stats = rnn.memory_stats()
    assert stats["drains"] > 0
    total = 0
    for layer, (cell, buf, s) in enumerate(zip(rnn.cells, rnn.last_window.buffers, stats["layers"])):
        units = B * cell.half
        assert s["normal_bits"] == 32 * T * B * cell.hidden_size * 2, layer  # h and c
        assert s["multiplications"] == 4 * T
        assert s["used_bits"] == len(buf.planes) * units * DRAIN_BITS + units * 64 + 4 * T
        assert 0 < s["optimal_bits"] <= 4 * T * units * 10
        total += s["used_bits"]
    assert stats["used_bits"] == total
    assert stats["efficiency"] == pytest.approx(stats["optimal_bits"] / stats["used_bits"])
