"""Dropout masks that cost no memory between forward and backward."""

from __future__ import annotations

import torch

from lightning_revrnn.core.dropout import SeededMask, locked_mask


def test_seeded_mask_redraws_the_identical_mask_and_follows_the_global_seed() -> None:
    torch.manual_seed(3)
    mask = SeededMask.sample((50, 40), 0.5, torch.device("cpu"))
    first = mask.materialize()
    torch.rand(10)  # the global RNG moving on changes nothing
    assert torch.equal(first, mask.materialize())
    assert set(first.unique().tolist()) == {0.0, 2.0}
    torch.manual_seed(3)
    assert torch.equal(SeededMask.sample((50, 40), 0.5, torch.device("cpu")).materialize(), first)


def test_locked_mask_is_scaled_and_none_without_dropout() -> None:
    like = torch.empty(())
    assert locked_mask((4, 4), 0.0, like) is None
    torch.manual_seed(0)
    mask = locked_mask((1000,), 0.25, like)
    assert mask is not None and set(mask.unique().tolist()) <= {0.0, float(torch.tensor(1 / 0.75))}
    assert abs(float(mask.mean()) - 1.0) < 0.1
