"""Fixed-point conversion, forget limiting and the exactly reversible multiply (spec section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_revrnn.core.errors import FixedPointOverflowError
from lightning_revrnn.core.fixed_point import (
    FORGET_ONE,
    R_H,
    RangeGuard,
    forget_floor,
    reversible_divide,
    reversible_multiply,
    to_fixed,
    to_float,
)
from lightning_revrnn.core.gates import forget_scaled, round_forget

ints = st.integers(min_value=-(2**50), max_value=2**50)
forgets = st.integers(min_value=1, max_value=FORGET_ONE)
words = st.integers(min_value=0, max_value=2**53 - 1)


@settings(max_examples=300, deadline=None)
@given(h=st.lists(ints, min_size=1, max_size=8), z=forgets, w=words)
def test_multiply_then_divide_restores_value_and_word(h: list[int], z: int, w: int) -> None:
    ht = torch.tensor(h, dtype=torch.int64)
    zt = torch.full_like(ht, z)
    wt = torch.full_like(ht, w)
    h2, w2 = reversible_multiply(ht, zt, wt)
    h3, w3 = reversible_divide(h2, zt, w2)
    assert torch.equal(h3, ht) and torch.equal(w3, wt)


@settings(max_examples=300, deadline=None)
@given(h=ints, z=forgets, w=words)
def test_multiply_matches_python_integers_and_is_close_to_the_product(h: int, z: int, w: int) -> None:
    """Floor division and non-negative remainder, also for negative h (Python's semantics)."""
    ht, zt, wt = (torch.tensor([v], dtype=torch.int64) for v in (h, z, w))
    h2, w2 = reversible_multiply(ht, zt, wt)
    b = w * FORGET_ONE + h % FORGET_ONE
    expect_h = (h // FORGET_ONE) * z + b % z
    assert int(h2) == expect_h and int(w2) == b // z
    assert abs(int(h2) - h * z / FORGET_ONE) < z


def test_to_fixed_round_trip_is_exact_on_the_grid() -> None:
    h = torch.randint(-(2**40), 2**40, (1000,), dtype=torch.int64)
    assert torch.equal(to_fixed(to_float(h, torch.float64)), h)
    small = torch.randint(-(2**24) + 1, 2**24, (1000,), dtype=torch.int64)
    assert torch.equal(to_fixed(to_float(small)), small)  # float32 is exact below 2^24 (|h| < 2)
    assert to_fixed(torch.tensor([0.5])).item() == 1 << (R_H - 1)


@pytest.mark.parametrize("k", [1, 2, 3, 5, None])
def test_forget_limit_bounds_bits_per_step(k: int | None) -> None:
    scaled = forget_scaled(torch.sigmoid(torch.linspace(-30, 30, 2001)), k)
    zq, value = round_forget(scaled, k)
    assert torch.equal(value, zq.to(value.dtype) / FORGET_ONE)
    assert int(zq.min()) >= forget_floor(k) and int(zq.max()) <= FORGET_ONE
    if k is not None:
        assert float(scaled.min()) / FORGET_ONE >= 2.0**-k - 1e-7
        assert max(math.log2(FORGET_ONE / int(v)) for v in zq.unique()) <= k
    else:
        assert int(zq.min()) == 1  # sigmoid(-30) rounds to 0 and is set to 1: at most 10 bits


def test_range_guard_rejects_nan_inf_and_huge_values() -> None:
    guard = RangeGuard()
    guard.observe("ok", torch.tensor([1.0, -5.0]))
    guard.check()
    for bad in (float("nan"), float("inf"), 2.0**31):
        guard.observe("ok", torch.tensor([1.0, -5.0]))
        guard.observe("state", torch.tensor([0.0, bad]))
        with pytest.raises(FixedPointOverflowError, match=r"state holds .* fixed-point range"):
            guard.check()
