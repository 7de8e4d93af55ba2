"""The exact carry of a final state into the next window.

The fixed-point state does not always fit in float32 (beyond ±1 it has more bits), so a module returns the
correctly rounded float32 ``h_n`` and remembers the exact float64 state of its last few forwards. When the
next ``hx`` is a returned ``h_n`` (or ``h_n.detach()``, or a view of it: the same storage), each element that
still holds the rounding of the exact value continues from the exact value (elementwise, no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_revrnn.core.fixed_point import straight_through

#: Forwards whose exact final states are kept.
EXACT_CACHE_SIZE = 4


class ExactCarry:
    """The exact final states of a module's last :data:`EXACT_CACHE_SIZE` forwards, matched to a later ``hx``
    by storage (the returned tensors themselves are held, so no other tensor can take their address while
    kept). A copy (``clone()``, ``.to(...)``) is not matched: equal rounding alone does not prove it is the
    same state; use the module's ``exact_state`` for a state that must outlive the cache.

    Example::

        >>> carry = ExactCarry()
        >>> h = torch.tensor([1.0])
        >>> carry.remember([h], [torch.tensor([1.0 + 2.0**-30], dtype=torch.float64)])
        >>> carry.resolve([h.detach()])[0].item() == 1.0 + 2.0**-30
        True
    """

    def __init__(self) -> None:
        self._kept: list[tuple[list[Tensor], list[Tensor]]] = []

    def remember(self, returned: list[Tensor], exact: list[Tensor]) -> None:
        """Keep ``exact`` (float64) for the ``returned`` tensors (flat, in the module's state order)."""
        held = [t.detach() for t in returned]
        self._kept = [*self._kept[-(EXACT_CACHE_SIZE - 1) :], (held, exact)]

    def resolve(self, flat: list[Tensor]) -> list[Tensor]:
        """Float64 initial states: exact where ``flat[i]`` is (a view of) a kept returned tensor and an
        element still holds the rounding of the exact value (with ``flat``'s gradient, straight through),
        the given value elsewhere."""
        resolved = []
        for i, t in enumerate(flat):
            given = t if t.dtype == torch.float64 else t.double()
            match = self._match(i, t)
            if match is None or t.dtype == torch.float64:
                resolved.append(given)
                continue
            value = torch.where(match.float().to(t.dtype) == t.detach(), match, given.detach())
            resolved.append(straight_through(value, given))
        return resolved

    def _match(self, i: int, t: Tensor) -> Tensor | None:
        for held, exact in reversed(self._kept):
            h = held[i] if i < len(held) else None
            if h is not None and h.data_ptr() == t.data_ptr() and h.shape == t.shape and h.dtype == t.dtype:
                return exact[i]
        return None
