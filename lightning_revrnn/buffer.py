"""The information buffer: where a layer keeps the bits that forgetting destroys (spec sections 3-4).

Each layer owns one int64 *word* per (batch, hidden/2) unit, shared by all of that layer's
multiplications, as in the reference. A word must stay below ``2^(63 - R_Z)`` before a multiplication.
Where the reference pushes a whole int64 snapshot whenever any unit nears that limit and restarts every
unit from zero, this buffer *drains* words example by example: the low 32 bits of an example's words
move into an int32 plane row and the high bits stay in place.

**Drains are decided per example.** The rule is a function of one example's own words only, so no
example's trajectory (the drains change the low bits a multiplication injects into ``h``) depends on its
batchmates: with the same float gates, an example computes bit for bit the same alone, in a batch, or on
any DDP rank. The rule: at every *check point* (before multiplication ``m`` with ``m % period == 0``,
``period = 1 + (WORD_LIMIT_BITS - DRAIN_BITS) // k``, :func:`check_period`), every example whose largest
word has more than ``DRAIN_BITS`` bits drains. Why it never overflows: after a check point every word has
at most 32 bits (more than 32: minus 32 leaves at most ``63 - 32``); a multiplication adds at most ``k``
bits, so the ``period - 1`` multiplications until the next check point start from at most
``32 + (period - 1)·k ≤ 53 = WORD_LIMIT_BITS`` bits. A drained plane row is always full (its word had more
than 32 bits).

**Synchronisations.** The host keeps a per-example upper bound on the bit length (``+k`` per
multiplication). At a check point the device is read (one synchronisation, ``batch`` integers) only if
some example's bound exceeds 32; that read refreshes every example's bound, which is allowed because the
rule depends on the real words only (an example whose bound is at most 32 would not drain anyway). So a
layer's forward synchronises at most ``ceil(M / period)`` times for ``M`` multiplications
(``period`` = 22, 11, 8, 5, 3 for ``k`` = 1, 2, 3, 5, no limit), independent of the batch size; the
reverse sweep never does.

The reverse sweep replays each drain for exactly the examples that drained (a drain is recorded by the
index of the multiplication it preceded and its rows), so the buffer shrinks back to empty (every word
zero, no plane left) after a full sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
#: Bits moved from each of a drained example's words into its plane row per drain; an example drains at a
#: check point when its largest word has more than this many bits.
DRAIN_BITS = 32
_DRAIN_MASK = (1 << DRAIN_BITS) - 1
_DRAIN_OFFSET = 1 << (DRAIN_BITS - 1)  # stores [0, 2^32) in int32 as [-2^31, 2^31)


def row_index_dtype(batch: int) -> torch.dtype:
    """The smallest integer dtype that holds every row index of a batch: the stored indices of partial drains."""
    if batch <= 256:
        return torch.uint8
    return torch.int16 if batch <= 2**15 else torch.int32


def check_period(max_forget_bits: int | None) -> int:
    """Multiplications from one drain check point to the next: ``1 + (WORD_LIMIT_BITS - DRAIN_BITS) // k``.

    The largest period for which words of at most ``DRAIN_BITS`` bits after a check point stay below
    ``2^WORD_LIMIT_BITS`` until the next one (see the module docstring).
    """
    return 1 + (WORD_LIMIT_BITS - DRAIN_BITS) // bits_per_multiply(max_forget_bits)


@dataclass(frozen=True)
class BufferStats:
    """The paper's accounting of one layer for one window (bits).

    ``normal_bits``: what storing the states would take (32 per hidden value per step, ×2 with a cell);
    ``used_bits``: what the buffer actually holds: the plane rows (32 bits per unit of a drained example),
    the row indices of drains that took only part of the batch (8 bits each up to batch 256, see
    :func:`row_index_dtype`), the final words (64 bits per unit) and one flag bit per multiplication
    (whether a drain preceded it);
    ``optimal_bits``: the information-theoretic floor ``Σ -log2 z`` over all buffered multiplications,
    kept on the device until :meth:`as_dict` reads it (so a forward never waits for it);
    ``drains``: example drains (an example draining all its units counts one).
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

    Drain records (parallel lists, one entry per check point at which some example drained):
    ``drained_before`` (the index of the multiplication the drain preceded), ``drained_rows`` (int64
    row indices on the device in :func:`row_index_dtype`, ``None`` when every example drained), ``drained_counts`` (how many
    examples drained) and, when retained, ``planes`` (int32, ``(drained examples, hidden_size // 2)``).
    ``syncs`` counts the host-device synchronisations of the forward.
    """

    def __init__(
        self, shape: tuple[int, int], device: torch.device, max_forget_bits: int | None, retain: bool
    ) -> None:
        self.word = torch.zeros(shape, dtype=torch.int64, device=device)
        self.retain = retain
        self.planes: list[Tensor] = []
        self.drained_before: list[int] = []
        self.drained_rows: list[Tensor | None] = []
        self.drained_counts: list[int] = []
        self.multiplications = 0
        self.syncs = 0
        self._step_bits = bits_per_multiply(max_forget_bits)
        self._period = check_period(max_forget_bits)
        self._bound = np.zeros(shape[0], dtype=np.int64)  # example b's words are all < 2^_bound[b]
        self._log2_z_sum: Tensor | None = None

    def multiply(self, h: Tensor, z: Tensor) -> Tensor:
        """Forward: ``h* ← h*·z*/2^R_Z``, pushing the lost bits (after draining full examples at a check point)."""
        if self.multiplications % self._period == 0 and int(self._bound.max(initial=0)) > DRAIN_BITS:
            self._drain_full_examples()
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
            self._undo_drain()
        return h

    def _drain_full_examples(self) -> None:
        # One synchronisation: every example's real bit length (the largest of its words).
        maxima = self.word.amax(1)
        bits = np.array([int(v).bit_length() for v in maxima.tolist()], dtype=np.int64)
        self.syncs += 1
        full = np.flatnonzero(bits > DRAIN_BITS)
        bits[full] -= DRAIN_BITS
        self._bound = bits
        if full.size == 0:
            return
        rows = None
        if full.size < self.word.shape[0]:
            # The drained rows in ascending order, built on the device (a host-to-device copy would wait).
            fits = (maxima <= _DRAIN_MASK).to(torch.int8)
            rows = torch.argsort(fits, stable=True)[: full.size]
        words = self.word if rows is None else self.word.index_select(0, rows)
        if self.retain:
            self.planes.append(((words & _DRAIN_MASK) - _DRAIN_OFFSET).to(torch.int32))
        kept = words >> DRAIN_BITS
        self.word = kept if rows is None else self.word.index_copy(0, rows, kept)
        self.drained_before.append(self.multiplications)
        kept_rows = rows.to(row_index_dtype(self.word.shape[0])) if self.retain and rows is not None else None
        self.drained_rows.append(kept_rows)
        self.drained_counts.append(int(full.size))

    def _undo_drain(self) -> None:
        if not self.retain:
            raise RuntimeError(
                "This information buffer was filled without retain=True (evaluation), so its drained bits were "
                "dropped and it cannot be reversed. Fix: run the forward with gradients (training) to reverse it."
            )
        self.drained_before.pop()
        self.drained_counts.pop()
        stored = self.drained_rows.pop()
        rows = None if stored is None else stored.long()
        low = self.planes.pop().to(torch.int64) + _DRAIN_OFFSET
        words = self.word if rows is None else self.word.index_select(0, rows)
        restored = (words << DRAIN_BITS) | low
        self.word = restored if rows is None else self.word.index_copy(0, rows, restored)

    def is_empty(self) -> bool:
        """True once a reverse sweep has undone every multiplication: no plane left, every word zero."""
        return (
            not self.planes and not self.drained_before and self.multiplications == 0 and not bool(self.word.any())
        )

    def tensors(self) -> list[Tensor]:
        """What must live until the reverse sweep: the planes, the drains' row indices and the current words."""
        return [*self.planes, *[r for r in self.drained_rows if r is not None], self.word]

    def stats(self, normal_bits: int) -> BufferStats:
        """The window's accounting; call at the end of a retained forward (see :class:`BufferStats`)."""
        units = self.word.numel()
        optimal: float | Tensor = 0.0
        if self._log2_z_sum is not None:
            optimal = self.multiplications * units * R_Z - self._log2_z_sum
        plane_bits = sum(p.numel() for p in self.planes) * DRAIN_BITS
        index_bits = sum(r.numel() * r.element_size() * 8 for r in self.drained_rows if r is not None)
        used = plane_bits + index_bits + units * 64 + self.multiplications
        return BufferStats(
            normal_bits=normal_bits,
            used_bits=used if self.multiplications else 0,
            optimal_bits=optimal,
            drains=sum(self.drained_counts),
            multiplications=self.multiplications,
        )
