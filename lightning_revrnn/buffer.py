"""The information buffer: where a layer keeps the bits that forgetting destroys (spec sections 3-4).

Each layer owns one int64 *word* per (batch, hidden/2) unit, shared by all of that layer's
multiplications, as in the reference. A word must stay below ``2^(63 - R_Z)`` before a multiplication.
Where the reference pushes a whole int64 snapshot whenever any unit nears that limit and restarts every
unit from zero, this buffer *drains* only the low 32 bits of every word into an int32 plane and keeps the
high bits in place: the plane is completely full for the fullest unit, and no 64-bit snapshot is ever
stored half empty. When to drain is decided on the host from a bound on how fast words can grow
(at most ``k`` bits per multiplication), so the device is consulted (one synchronisation) only when
that bound says a word might be close to the limit, not at every multiplication.

The reverse sweep replays the drains backwards (a drain is recorded by the index of the multiplication
it preceded), so the buffer shrinks back to empty (every word zero, no plane left) after a full sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_revrnn.fixed_point import (
    R_Z,
    bits_per_multiply,
    reversible_divide,
    reversible_multiply,
)

#: A word must be below ``2^WORD_LIMIT_BITS`` before a multiplication (so ``word·2^R_Z`` fits in int64).
WORD_LIMIT_BITS = 63 - R_Z
#: Bits moved from every word into a plane per drain.
DRAIN_BITS = 32
_DRAIN_MASK = (1 << DRAIN_BITS) - 1
_DRAIN_OFFSET = 1 << (DRAIN_BITS - 1)  # stores [0, 2^32) in int32 as [-2^31, 2^31)


@dataclass(frozen=True)
class BufferStats:
    """The paper's accounting of one layer for one window (bits).

    ``normal_bits``: what storing the states would take (32 per hidden value per step, ×2 with a cell);
    ``used_bits``: what the buffer actually holds (planes, final words, one flag bit per multiplication);
    ``optimal_bits``: the information-theoretic floor ``Σ -log2 z`` over all buffered multiplications,
    kept on the device until :meth:`as_dict` reads it (so a forward never waits for it).
    """

    normal_bits: int
    used_bits: int
    optimal_bits: float | Tensor
    drains: int
    multiplications: int

    def as_dict(self) -> dict[str, float]:
        """Flat mapping with the accounting, the ratios and the buffer's efficiency."""
        optimal = float(self.optimal_bits)
        return {
            "normal_bits": self.normal_bits,
            "used_bits": self.used_bits,
            "optimal_bits": optimal,
            "actual_ratio": _ratio(self.normal_bits, self.used_bits),
            "optimal_ratio": _ratio(self.normal_bits, optimal),
            "efficiency": _ratio(optimal, self.used_bits),
            "drains": self.drains,
            "multiplications": self.multiplications,
        }


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("inf")


class InformationBuffer:
    """Per-layer exact store of forgotten bits, growing as needed and emptied by the reverse sweep.

    Args:
        shape: ``(batch, hidden_size // 2)``: one word per unit of a half state.
        device: where the words live.
        max_forget_bits: the cell's ``k`` (``None``: up to ``R_Z`` bits per multiplication).
        retain: keep drained planes (training). Without it (evaluation) drained bits are dropped, so
            memory stays ``O(batch·H)``; the arithmetic, drains included, is identical.
    """

    def __init__(
        self, shape: tuple[int, int], device: torch.device, max_forget_bits: int | None, retain: bool
    ) -> None:
        self.word = torch.zeros(shape, dtype=torch.int64, device=device)
        self.retain = retain
        self.planes: list[Tensor] = []
        self.drained_before: list[int] = []
        self.multiplications = 0
        self._step_bits = bits_per_multiply(max_forget_bits)
        self._bound = 0  # every word < 2^_bound
        self._log2_z_sum: Tensor | None = None

    def multiply(self, h: Tensor, z: Tensor) -> Tensor:
        """Forward: ``h* ← h*·z*/2^R_Z``, pushing the lost bits."""
        if self._bound > WORD_LIMIT_BITS:
            self._make_room()
        h, self.word = reversible_multiply(h, z, self.word)
        self._bound += self._step_bits
        self.multiplications += 1
        if self.retain:
            log2_z = torch.log2(z.to(torch.float64)).sum()
            self._log2_z_sum = log2_z if self._log2_z_sum is None else self._log2_z_sum + log2_z
        return h

    def divide(self, h: Tensor, z: Tensor) -> Tensor:
        """Reverse: undo the latest :meth:`multiply` not yet undone, popping its bits."""
        self.multiplications -= 1
        h, self.word = reversible_divide(h, z, self.word)
        if self.drained_before and self.drained_before[-1] == self.multiplications:
            self.drained_before.pop()
            low = self.planes.pop().to(torch.int64) + _DRAIN_OFFSET
            self.word = (self.word << DRAIN_BITS) | low
        return h

    def _make_room(self) -> None:
        # The host bound says a word may be near the limit: look at the real maximum (one sync).
        self._bound = int(self.word.max()).bit_length()
        if self._bound <= DRAIN_BITS:
            return
        if self.retain:
            self.planes.append(((self.word & _DRAIN_MASK) - _DRAIN_OFFSET).to(torch.int32))
        self.word = self.word >> DRAIN_BITS
        self.drained_before.append(self.multiplications)
        self._bound -= DRAIN_BITS

    def is_empty(self) -> bool:
        """True once a reverse sweep has undone every multiplication: no plane left, every word zero."""
        return not self.planes and self.multiplications == 0 and not bool(self.word.any())

    def tensors(self) -> list[Tensor]:
        """What must live until the reverse sweep: the planes and the current words."""
        return [*self.planes, self.word]

    def stats(self, normal_bits: int) -> BufferStats:
        """The window's accounting; call at the end of a retained forward."""
        units = self.word.numel()
        optimal: float | Tensor = 0.0
        if self._log2_z_sum is not None:
            optimal = self.multiplications * units * R_Z - self._log2_z_sum
        used = len(self.planes) * units * DRAIN_BITS + units * 64 + self.multiplications
        return BufferStats(
            normal_bits=normal_bits,
            used_bits=used if self.multiplications else 0,
            optimal_bits=optimal,
            drains=len(self.drained_before),
            multiplications=self.multiplications,
        )
