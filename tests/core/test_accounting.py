"""MemoryAccounting: totals keep their parts, ratios are computed in one place and never divide by zero."""

from __future__ import annotations

import math

import torch

from lightning_revrnn import MemoryAccounting, RevLSTM


def test_total_sums_every_field_and_keeps_the_parts() -> None:
    a = MemoryAccounting(normal_bits=100, used_bits=10, optimal_bits=5.0, drains=1, multiplications=4, stored_bits=2)
    b = MemoryAccounting(normal_bits=300, used_bits=30, optimal_bits=torch.tensor(15.0), drains=0, multiplications=8)
    total = MemoryAccounting.total([a, b])
    assert (total.normal_bits, total.used_bits, total.drains, total.multiplications, total.stored_bits) == (
        400,
        40,
        1,
        12,
        2,
    )
    assert total.optimal == 20.0 and total.layers == (a, b)
    assert total.actual_ratio == 10.0 and total.optimal_ratio == 20.0 and total.efficiency == 0.5


def test_ratios_of_an_empty_buffer_are_infinite_not_an_error() -> None:
    empty = MemoryAccounting(normal_bits=64, used_bits=0, optimal_bits=0.0, drains=0, multiplications=0)
    assert math.isinf(empty.actual_ratio) and math.isinf(empty.optimal_ratio) and math.isinf(empty.efficiency)


def test_as_dict_holds_the_ratios_and_one_mapping_per_layer() -> None:
    torch.manual_seed(0)
    rnn = RevLSTM(3, [4, 6], num_layers=2)
    rnn(torch.randn(10, 2, 3, requires_grad=True))
    stats = rnn.memory_stats()
    flat = stats.as_dict()
    assert flat["actual_ratio"] == stats.actual_ratio and flat["efficiency"] == stats.efficiency
    layers = flat["layers"]
    assert isinstance(layers, list)
    assert [layer["normal_bits"] for layer in layers] == [s.normal_bits for s in stats.layers]
    assert stats.normal_bits == 32 * 10 * 2 * (4 + 6) * 2  # h and c of both layers, every step
