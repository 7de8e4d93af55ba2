"""The gate equations: one block or one gate a tensor give the same values; rounding stays in range; a held
step is the identity."""

from __future__ import annotations

import pytest
import torch

from lightning_revrnn.core.fixed_point import FORGET_ONE, forget_floor
from lightning_revrnn.core.gates import forget_scaled, gru_gates, gru_gates_split, hold, masked, round_forget


def test_gru_gates_split_equals_the_block_form() -> None:
    torch.manual_seed(0)
    w, xp, other = torch.randn(12, 4), torch.randn(3, 12), torch.randn(3, 4)
    zr, g, r_other = gru_gates(w, xp, other)
    z, r, g2, r_other2 = gru_gates_split(w, xp, other)
    torch.testing.assert_close(torch.cat([z, r], 1), zr)
    torch.testing.assert_close(g2, g)
    torch.testing.assert_close(r_other2, r_other)


@pytest.mark.parametrize("k", [1, 3, None])
def test_rounded_forget_values_stay_in_the_allowed_range(k: int | None) -> None:
    z = torch.tensor([0.0, 1e-6, 0.3, 0.999, 1.0])
    zq, zs = round_forget(forget_scaled(z, k), k)
    assert zq.dtype == torch.int64 and int(zq.min()) >= forget_floor(k) and int(zq.max()) <= FORGET_ONE
    assert torch.equal(zs * FORGET_ONE, zq.float())


def test_hold_makes_a_step_the_identity_on_masked_rows() -> None:
    keep = torch.tensor([[True], [False]])
    q, f, a = torch.full((2, 3), 5), torch.full((2, 3), 0.5), torch.full((2, 3), 0.25)
    (q2,), (f2,), (a2,) = hold(keep, [q], [f], [a])
    assert q2 is not None  # a rounded forget value given stays a tensor
    assert q2[1].eq(FORGET_ONE).all() and f2[1].eq(1.0).all() and a2[1].eq(0.0).all()
    assert q2[0].eq(5).all() and f2[0].eq(0.5).all() and a2[0].eq(0.25).all()
    assert hold(None, [q], [f], [a]) == ([q], [f], [a])
    assert masked(a, None) is a and masked(a, keep).sum() == a[0].sum()
