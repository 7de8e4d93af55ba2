"""The input checks: the keep mask as the sweep reads it, and float32 parameters, each error naming the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_revrnn.core.inputs import check_float32_parameters, check_keep


def test_keep_is_laid_out_time_first_with_a_trailing_unit_dimension() -> None:
    x = torch.zeros(5, 3, 2)  # (batch, time, features) with batch_first
    keep = torch.ones(5, 3, dtype=torch.bool)
    keep[1, 2] = False
    checked = check_keep(keep, x, batch_first=True)
    assert checked is not None and checked.shape == (3, 5, 1) and not bool(checked[2, 1, 0])
    assert check_keep(None, x, batch_first=False) is None
    with pytest.raises(ValueError, match=r"Fix: pass keep=lengths_mask\.bool\(\)"):
        check_keep(keep.int(), x, batch_first=True)


def test_non_float32_parameters_are_refused_naming_the_trainer_precision() -> None:
    check_float32_parameters(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"precision='32-true'"):
        check_float32_parameters(nn.Linear(2, 2).double())
