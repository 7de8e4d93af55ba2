"""BPTT windows: the batch contract, continuity, reset flags, and reproducible variable lengths."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_revrnn.datamodules import StreamWindowDataset, window_lengths
from lightning_revrnn.datamodules.datasets import MIN_VARIABLE_BPTT


def _streams(length: int = 101, width: int = 3) -> torch.Tensor:
    return torch.arange(length * width).view(width, length).t().contiguous()


def test_fixed_windows_contract_and_continuity() -> None:
    streams = _streams()
    ds = StreamWindowDataset(streams, bptt=30)
    items = list(DataLoader(ds, batch_size=None))
    assert len(items) == len(ds) == 4
    assert [it["inputs"].shape[0] for it in items] == [30, 30, 30, 10]
    assert [it["reset"] for it in items] == [True, False, False, False]
    for it in items:
        assert it["inputs"].dtype == it["targets"].dtype == torch.long
        assert it["inputs"].shape == it["targets"].shape and it["inputs"].shape[1] == 3
        assert torch.equal(it["targets"][:-1], it["inputs"][1:])  # targets[t] = inputs[t+1]
    for prev, nxt in itertools.pairwise(items):
        assert torch.equal(prev["targets"][-1], nxt["inputs"][0])  # the next window continues the streams
    rebuilt = torch.cat([it["inputs"] for it in items] + [items[-1]["targets"][-1:]])
    assert torch.equal(rebuilt, streams)
    # a second pass starts again with reset=True
    again = list(ds)
    assert again[0]["reset"] and torch.equal(again[0]["inputs"], items[0]["inputs"])


def test_variable_lengths_follow_awd_rule_and_cover_the_stream() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = window_lengths(100_000, 70, variable=True, generator=gen)
    assert sum(lengths) == 100_000
    body = torch.tensor(lengths[:-1], dtype=torch.float64)
    assert body.min() >= MIN_VARIABLE_BPTT
    assert 65 < body.mean() < 70  # 0.95 * 70 + 0.05 * 35 ~= 68.25 (minus int truncation)
    assert (body < 52).double().mean() == pytest.approx(0.05, abs=0.015)  # the bptt/2 windows
    assert window_lengths(10, 4) == [4, 4, 2]


def test_variable_bptt_reproducible_per_seed_and_epoch() -> None:
    def lengths(seed: int, epochs: int = 2) -> list[list[int]]:
        ds = StreamWindowDataset(_streams(2001), 35, variable_bptt=True, seed=seed)
        return [[it["inputs"].shape[0] for it in ds] for _ in range(epochs)]

    a, b = lengths(0), lengths(0)
    assert a == b  # two instances, same seed -> identical windows
    assert a[0] != a[1]  # a new draw each epoch (the counter advances per __iter__)
    assert lengths(1)[0] != a[0]
    with pytest.raises(TypeError, match="varies by epoch"):
        len(StreamWindowDataset(_streams(), 35, variable_bptt=True))


def test_epoch_from_callable_and_set_epoch() -> None:
    current = {"epoch": 3}
    ds = StreamWindowDataset(_streams(2001), 35, variable_bptt=True, epoch_fn=lambda: current["epoch"])
    ref = StreamWindowDataset(_streams(2001), 35, variable_bptt=True)
    ref.set_epoch(3)
    assert ds.lengths() == ref.lengths() == ref.lengths(3)
    assert [it["inputs"].shape[0] for it in ds] == ref.lengths(3)
    assert ds.epoch == 3  # the callable wins over the counter


def test_invalid_streams() -> None:
    with pytest.raises(ValueError, match="too small"):
        StreamWindowDataset(torch.zeros(1, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"\(L, B\)"):
        StreamWindowDataset(torch.zeros(8, dtype=torch.long), 5)
