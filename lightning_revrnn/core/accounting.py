"""The paper's memory accounting (spec section 4) as one typed structure, from a layer's buffer to a whole
model and to :class:`~lightning_revrnn.callbacks.MemoryReport`; the ratios are computed here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from torch import Tensor


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` as a float, ``inf`` for a zero denominator (nothing stored)."""
    return float(numerator) / float(denominator) if denominator else float("inf")


@dataclass(frozen=True)
class MemoryAccounting:
    """What a window of a reversible layer (or a sum of layers) stores, in bits.

    ``normal_bits``: what storing the states would take (32 per hidden value per step, ×2 with a cell state);
    ``used_bits``: what the buffer actually holds (the drained 32-bit slots and the bit-packed final words
    and stack depths) plus ``stored_bits``; ``optimal_bits``: the floor ``Σ -log2 z*`` over the buffered
    multiplications plus ``stored_bits``, kept on the device until read (a forward never waits for it);
    ``drains``: slots drained (one per unit and drain); ``stored_bits``: stored units (attention slices,
    32 bits per unit and step), already counted in ``used_bits`` and ``optimal_bits``; ``layers``: the parts a
    total was summed from (empty for one layer).

    Example::

        >>> a = MemoryAccounting(normal_bits=3200, used_bits=200, optimal_bits=100.0, drains=1, multiplications=20)
        >>> a.actual_ratio, a.optimal_ratio, a.efficiency
        (16.0, 32.0, 0.5)
    """

    normal_bits: int
    used_bits: int
    optimal_bits: float | Tensor
    drains: int
    multiplications: int
    stored_bits: int = 0
    layers: tuple[MemoryAccounting, ...] = field(default=(), compare=False)

    @classmethod
    def total(cls, parts: Iterable[MemoryAccounting]) -> MemoryAccounting:
        """The sum of ``parts`` (layers, or an encoder and a decoder), which it keeps as :attr:`layers`."""
        parts = tuple(parts)
        summed = {f.name: sum(getattr(p, f.name) for p in parts) for f in fields(cls) if f.name != "layers"}
        return cls(**summed, layers=parts)

    @property
    def optimal(self) -> float:
        """:attr:`optimal_bits` as a float (reads it from the device)."""
        return float(self.optimal_bits)

    @property
    def actual_ratio(self) -> float:
        """``normal / used``: how many times less the buffer stores than storing the states would."""
        return ratio(self.normal_bits, self.used_bits)

    @property
    def optimal_ratio(self) -> float:
        """``normal / optimal``: the same at the information floor."""
        return ratio(self.normal_bits, self.optimal)

    @property
    def efficiency(self) -> float:
        """``optimal / used``: how close the buffer is to the floor (1 at best)."""
        return ratio(self.optimal, self.used_bits)

    def as_dict(self) -> dict[str, object]:
        """A flat mapping of the figures and ratios (``layers``: one mapping per part), for logs and JSON."""
        out: dict[str, object] = {
            "normal_bits": self.normal_bits,
            "used_bits": self.used_bits,
            "optimal_bits": self.optimal,
            "actual_ratio": self.actual_ratio,
            "optimal_ratio": self.optimal_ratio,
            "efficiency": self.efficiency,
            "drains": self.drains,
            "multiplications": self.multiplications,
            "stored_bits": self.stored_bits,
        }
        if self.layers:
            out["layers"] = [layer.as_dict() for layer in self.layers]
        return out
