"""The exact carry: a returned h_n continues bit for bit; a copy or a changed element does not pretend to."""

from __future__ import annotations

import torch

from lightning_revrnn.core.carry import EXACT_CACHE_SIZE, ExactCarry


def test_a_returned_state_resolves_to_its_exact_value_elementwise() -> None:
    carry = ExactCarry()
    exact = torch.tensor([1.0 + 2.0**-30, 3.0], dtype=torch.float64)
    returned = exact.float()
    carry.remember([returned], [exact])
    given = returned.detach()  # a view of the same storage
    assert torch.equal(carry.resolve([given])[0], exact)
    given[1] = 5.0  # changed in place: that element is used as given
    assert carry.resolve([given])[0].tolist() == [1.0 + 2.0**-30, 5.0]
    assert torch.equal(carry.resolve([returned.clone()])[0], returned.clone().double())  # a copy: its own value


def test_only_the_last_few_forwards_are_kept() -> None:
    carry = ExactCarry()
    returned = [torch.tensor([float(i)]) for i in range(EXACT_CACHE_SIZE + 1)]
    for i, t in enumerate(returned):
        carry.remember([t], [torch.tensor([i + 0.5], dtype=torch.float64)])
    assert carry.resolve([returned[0]])[0].item() == 0.0  # forgotten: used as given
    assert carry.resolve([returned[-1]])[0].item() == EXACT_CACHE_SIZE  # rounding differs from the kept value
