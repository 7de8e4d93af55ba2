"""The information buffer: where a layer keeps the bits that forgetting destroys (spec sections 3-4).

Each layer owns one int64 *word* per (batch, hidden/2) unit, shared by all of its multiplications, and a
stack of 32-bit slots per unit. Like an rANS coder renormalising, every unit drains on its own, decided from
its own word alone:

- **Forward.** Before a multiplication by ``z*``, a unit whose word is at least ``z*·2^32`` moves the word's
  low 32 bits onto its stack (:meth:`InformationBuffer.begin_multiply`). Every word stays below ``2^42``
  (:data:`WORD_BITS`): without a drain the multiplication keeps it below ``z*·2^32·2^R_Z/z*``, and after one
  it is at least ``z*``, so the multiplication lifts it to at least ``2^R_Z`` (:data:`FLOOR`), and words never
  shrink under multiplication.
- **Reverse.** Undoing a multiplication gives back the word it started from: below :data:`FLOOR` on a unit
  whose stack is not empty means that multiplication was preceded by a drain (a unit with slots never rests
  below the floor otherwise), so the slot is popped back (:meth:`InformationBuffer.end_divide`). No flag, no
  record per multiplication, no decision involving another unit or example.

The forward never reads the device: slots are written into a dense stack sized by a host-known bound
(:func:`stack_capacity`). At the window's end one host read (:meth:`InformationBuffer.window_sizes`) tells
:meth:`InformationBuffer.finish` how many slots there are and how many bits the final words need: the slots are
compacted unit after unit (int32), the final words and depths packed at the bit level
(:mod:`~lightning_revrnn.core.packing`) until the reverse sweep unpacks them. After a full sweep every word is
zero and every stack empty. docs/design.md has the proofs and what this costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.fixed_point import R_Z, bits_per_multiply, reversible_divide, reversible_multiply
from lightning_revrnn.core.packing import PackedWords, pack_units, payload_bits, unpack_units

#: Bits a drain moves from a word onto its unit's stack.
DRAIN_BITS = 32
#: Every word at rest is below ``2^WORD_BITS`` (so ``word·2^R_Z`` fits in int64 with room to spare).
WORD_BITS = DRAIN_BITS + R_Z
#: A unit that has drained rests at or above this; below it, after an undone multiplication, it had drained.
FLOOR = 1 << R_Z
_DRAIN_MASK = (1 << DRAIN_BITS) - 1


def stack_capacity(multiplications: int, max_forget_bits: int | None) -> int:
    """Slots a unit can have drained after ``multiplications``: ``m·k // 31``.

    ``log2(word + 1)`` starts at 0, grows by at most ``k`` per multiplication and drops by at least 31 per
    drain (a drained word is at least ``2^32``), so ``31·drains ≤ m·k``.
    """
    return multiplications * bits_per_multiply(max_forget_bits) // (DRAIN_BITS - 1)


@dataclass(frozen=True)
class DrainSite:
    """Where a kernel that drains by itself puts a multiplication's drains
    (:meth:`InformationBuffer.begin_kernel_multiply`): every unit whose word is at least ``z*·2^32`` writes the
    word's low 32 bits into ``stack[min(depth, last)]`` and advances its ``depth`` by one, in place, then
    multiplies with the word shifted right by 32. ``stack`` ``(slots, *shape)`` int32 and ``depth`` ``(*shape)``
    int64 are contiguous; both None without ``retain`` (the words drain, their bits are dropped)."""

    stack: Tensor | None
    depth: Tensor | None
    last: int


@dataclass(frozen=True)
class PopSite:
    """Where a kernel that pops by itself finds the slots of an undone multiplication
    (:meth:`InformationBuffer.begin_kernel_divide`): every unit whose restored word is below :data:`FLOOR` while
    ``top > start`` takes ``stack[top]``'s 32 bits back under its word and lowers its ``top`` by one, in place.
    ``top`` and ``start`` ``(*shape)`` int64 (contiguous); ``stack`` the compacted int32 slots."""

    stack: Tensor
    top: Tensor
    start: Tensor


class InformationBuffer:
    """Per-layer exact store of forgotten bits, growing as needed and emptied by the reverse sweep.

    Args:
        shape: ``(batch, hidden_size // 2)``: one word per unit of a half state.
        device: where the words live.
        max_forget_bits: the cell's ``k`` (``None``: up to ``R_Z`` bits per multiplication).
        retain: keep the drained slots (training). Without it (evaluation) drained bits are dropped, so memory
            stays ``O(batch·H)``; the arithmetic, drains included, is identical.
        multiplications: how many the window will make, when known: the dense stack is then sized once, at the
            first drain, for all of them (no growth, so no moment with two copies of it).

    Forward: :meth:`multiply` (or :meth:`begin_multiply` / :meth:`end_multiply` around a backend's kernel),
    then :meth:`finish` once at the window's end (one host read, or none when the caller passes the values of
    :meth:`window_sizes` it read itself). Reverse: :meth:`divide` (or :meth:`begin_divide` /
    :meth:`end_divide`). ``syncs`` counts the forward's host reads. After :meth:`finish`, :attr:`stack` holds
    every slot (int32: a word's low 32 bits, as its int32 cast keeps them), unit after unit, oldest first,
    after one unused element (so a unit's top slot is at ``start + depth``, and ``start`` is never -1).

    Example::

        >>> from lightning_revrnn.core.fixed_point import to_fixed
        >>> buf = InformationBuffer((2, 3), torch.device("cpu"), max_forget_bits=3, retain=True)
        >>> h = to_fixed(torch.randn(2, 3))
        >>> z = torch.full((2, 3), 700)  # z* = 700/1024: about 0.55 bits forgotten per unit
        >>> back = buf.divide(buf.multiply(h, z), z)
        >>> torch.equal(back, h), buf.is_empty()
        (True, True)
    """

    def __init__(
        self,
        shape: tuple[int, int],
        device: torch.device,
        max_forget_bits: int | None,
        retain: bool,
        multiplications: int | None = None,
    ) -> None:
        self._word: Tensor | None = torch.zeros(shape, dtype=torch.int64, device=device)
        self._packed: PackedWords | None = None  # the words and depths between forward and reverse
        self.retain = retain
        self.max_forget_bits = max_forget_bits
        self._expected = multiplications
        # forward: each unit's slots so far and the dense stack they are written into (slot, batch, unit)
        self._depth = torch.zeros(shape, dtype=torch.int64, device=device)
        self._dense = torch.empty((0, *shape), dtype=torch.int32, device=device)
        # after finish(): the slots, unit after unit; in reverse, each unit's top slot and the one below its first
        self.stack: Tensor | None = None
        self._start: Tensor | None = None
        self._top: Tensor | None = None
        self.multiplications = 0
        self.drains = 0  # slots drained in the window (known once finish() has run)
        self.syncs = 0
        self._step_bits = bits_per_multiply(max_forget_bits)
        #: Σ log2 z* per unit (float64) since the last :meth:`stats` (retaining only): the optimal bits' source.
        self.log2_z_units: Tensor | None = None
        self._log2_z_sum: Tensor | None = None  # Σ log2 z* over units, up to the last stats()

    @property
    def word(self) -> Tensor:
        """The int64 words (unpacked first if :meth:`finish` packed them)."""
        if self._word is None:
            assert self._packed is not None and self.stack is not None
            self._word, depth = unpack_units(self._packed)
            self._start = depth.flatten().cumsum(0).view(depth.shape) - depth
            self._top, self._packed = self._start + depth, None  # stack[0] unused: a unit's slots start + 1..top
        return self._word

    @word.setter
    def word(self, value: Tensor) -> None:
        self._word = value

    # ------------------------------------------------------------------------------------ forward
    def multiply(self, h: Tensor, z: Tensor) -> Tensor:
        """Forward: ``h* ← h*·z*/2^R_Z``, pushing the lost bits (after the units' drains). No host read.
        The reference arithmetic; a fast backend does the same through :meth:`begin_multiply` /
        :meth:`end_multiply` around its own kernel."""
        h, word = reversible_multiply(h, z, self.begin_multiply(z))
        if self.retain:  # the optimal bits: log2 z* per unit (float64), summed over units by stats()
            log2_z = torch.log2(z)  # float32 (NaN where z* came from NaN gates: the range guard reports those)
            self.log2_z_units = log2_z.double() if self.log2_z_units is None else self.log2_z_units + log2_z
        self.end_multiply(word)
        return h

    def begin_multiply(self, z: Tensor) -> Tensor:
        """Before a multiplication by ``z``: drain the units that need it and return the word to multiply
        with. A backend then calls :meth:`end_multiply` with the new word (and, when retaining, adds
        ``log2 z*`` per unit into :attr:`log2_z_units`)."""
        if not self._may_drain():
            return self.word
        word = self.word
        drains = word >= (z << DRAIN_BITS)
        if self.retain:
            self._push(word.to(torch.int32), drains)  # the cast keeps the low 32 bits
        return torch.where(drains, word >> DRAIN_BITS, word)

    def begin_kernel_multiply(self) -> tuple[Tensor, DrainSite | None]:
        """:meth:`begin_multiply` for a kernel that drains by itself: the word before any drain and, once a unit
        may drain, where its drains go (None before: the kernel multiplies only). Then :meth:`end_multiply`."""
        if not self._may_drain():
            return self.word, None
        if not self.retain:
            return self.word, DrainSite(None, None, 0)
        last = self._reserve()  # may replace the dense stack: read it after
        return self.word, DrainSite(self._dense, self._depth, last)

    def _may_drain(self) -> bool:
        """Before a multiplication of the forward: whether any unit may drain. Until ``log2(word + 1) ≤ m·k`` can
        reach ``log2(z*_min·2^32) = 42 - k``, none can."""
        if self.stack is not None:
            raise RuntimeError("This buffer's forward is finished (its words are packed); start a new window.")
        return (self.multiplications + 1) * self._step_bits > WORD_BITS

    def _reserve(self) -> int:
        """Size the dense stack for this multiplication's writes (the whole window's worth at once if known, else
        grown by half at least) and return the highest slot a write may use."""
        needed = stack_capacity(self.multiplications, self.max_forget_bits) + 1  # + the slot a write may fill
        if self._dense.shape[0] < needed:
            window = stack_capacity(self._expected or 0, self.max_forget_bits) + 1
            grown = max(needed, window, self._dense.shape[0] * 3 // 2)
            extra = self._dense.new_zeros((grown - self._dense.shape[0], *self._dense.shape[1:]))
            self._dense = torch.cat([self._dense, extra])
        return needed - 1

    def _push(self, low: Tensor, drains: Tensor) -> None:
        """Write every unit's low bits at its stack's next slot; only the draining units keep them."""
        slot = self._depth.clamp(max=self._reserve())  # within the bound anyway, unless z* was garbage (NaN gates)
        self._dense.scatter_(0, slot[None], low[None])
        self._depth += drains

    def end_multiply(self, word: Tensor) -> None:
        """After a multiplication: keep its new word and count it."""
        self.word = word
        self.multiplications += 1

    def window_sizes(self) -> Tensor:
        """End of a window's forward, on the device for the caller's one host read: int64 ``(3,)``, the slots
        drained, the largest depth and the final words' bits below their leading ones (empty without
        ``retain``: nothing to keep)."""
        if not self.retain:
            return self._depth.new_zeros(0)
        return torch.cat([self._depth.sum().reshape(1), self._depth.amax().reshape(1), payload_bits(self.word)])

    def finish(self, sizes: list[int] | None = None) -> None:
        """End of a window's forward: compact the slots unit after unit and pack the words and depths.

        One host read (the values of :meth:`window_sizes`) unless the caller passes them as ``sizes``; none
        without ``retain``. Idempotent."""
        if not self.retain or self.stack is not None:
            return
        if sizes is None:
            sizes = self.window_sizes().tolist()  # the forward's one synchronisation
        self.syncs += 1
        slots, deepest, payload = sizes
        depth, dense = self._depth, self._dense
        start = depth.flatten().cumsum(0).view(depth.shape) - depth + 1  # stack[0] is the unused element
        stack = torch.zeros(slots + 2, dtype=torch.int32, device=depth.device)  # + 1: where unused slots go
        for j in range(deepest):
            stack.scatter_(0, torch.where(j < depth, start + j, slots + 1).flatten(), dense[j].flatten())
        self.stack = stack[: slots + 1].clone() if slots else stack[:0].clone()
        self.drains = slots
        self._packed = pack_units(self.word, depth, int(deepest).bit_length(), payload)
        self._word = None
        # new empty tensors, not views: a view (dense[:0]) would keep the dense stack's storage alive until backward
        self._depth, self._dense = depth.new_zeros(0), dense.new_empty((0, *dense.shape[1:]))

    # ------------------------------------------------------------------------------------ reverse
    def divide(self, h: Tensor, z: Tensor) -> Tensor:
        """Reverse: undo the latest :meth:`multiply` not yet undone, popping its bits (no host read once
        :meth:`finish` has run). The reference arithmetic; a fast backend does the same through
        :meth:`begin_divide` / :meth:`end_divide` around its own kernel."""
        h, word = reversible_divide(h, z, self.begin_divide())
        self.end_divide(word)
        return h

    def begin_divide(self) -> Tensor:
        """Before undoing a multiplication: the word to divide with."""
        if not self.retain:
            raise RuntimeError(
                "This information buffer was filled without retain=True (evaluation), so its drained bits were "
                "dropped and it cannot be reversed. Fix: run the forward with gradients (training) to reverse it."
            )
        self.finish()
        self.multiplications -= 1
        return self.word

    def begin_kernel_divide(self) -> tuple[Tensor, PopSite | None]:
        """:meth:`begin_divide` for a kernel that pops by itself: the word to divide with and, where a unit may
        have drained before this multiplication, where its slots are (None: the kernel divides only). Then
        :meth:`end_kernel_divide`."""
        word = self.begin_divide()
        if not self._may_pop():
            return word, None
        assert self.stack is not None and self._top is not None and self._start is not None
        return word, PopSite(self.stack, self._top, self._start)

    def end_kernel_divide(self, word: Tensor) -> None:
        """After a kernel undid a multiplication and popped its slots: keep the restored word."""
        self.word = word

    def _may_pop(self) -> bool:
        """After :meth:`begin_divide`: whether a unit may have drained before this multiplication (there are slots,
        and enough multiplications came before it: see :meth:`_may_drain`)."""
        return bool(self.drains) and (self.multiplications + 1) * self._step_bits > WORD_BITS

    def end_divide(self, word: Tensor) -> None:
        """After undoing a multiplication: keep the restored word, and pop a slot back into every unit whose
        word fell below :data:`FLOOR` while its stack is not empty (the units that drained before it)."""
        assert self.stack is not None and self._top is not None and self._start is not None
        if self._may_pop():
            drained = (word < FLOOR) & (self._top > self._start)
            low = self.stack[self._top].to(torch.int64) & _DRAIN_MASK
            word = torch.where(drained, (word << DRAIN_BITS) | low, word)
            self._top -= drained.to(torch.int64)
        self.word = word

    def remaining(self) -> Tensor:
        """On the device: whether any word is non-zero or any slot not popped (a full sweep leaves none)."""
        left = self.word.any()
        if self._top is not None and self._start is not None:
            left = left | (self._top != self._start).any()
        return left | self._depth.any()

    def is_empty(self) -> bool:
        """True once a reverse sweep has undone every multiplication: every word zero, every slot popped."""
        return self.multiplications == 0 and not bool(self.remaining())

    # ---------------------------------------------------------------------------------- accounting
    def tensors(self) -> list[Tensor]:
        """What must live until the reverse sweep: the slots and the packed words (after :meth:`finish`,
        which this calls; the words themselves without ``retain``)."""
        self.finish()
        if self.stack is None:
            return [self.word]
        return [self.stack, self._packed.stream if self._packed is not None else self.word]

    def stats(self, normal_bits: int, stored_bits: int = 0) -> MemoryAccounting:
        """The window's accounting (after :meth:`finish`, which this calls); see
        :class:`~lightning_revrnn.core.accounting.MemoryAccounting`.
        ``stored_bits``: the layer's stored units, added to ``used_bits`` and ``optimal_bits``."""
        used = sum(t.numel() * t.element_size() * 8 for t in self.tensors())
        units = self.word.numel() if self._packed is None else self._packed.shape[0] * self._packed.shape[1]
        optimal: float | Tensor = 0.0
        if self.log2_z_units is not None:  # fold into one number: no per-unit tensor lives on
            total = self.log2_z_units.sum()
            self._log2_z_sum = total if self._log2_z_sum is None else self._log2_z_sum + total
            self.log2_z_units = None
        if self._log2_z_sum is not None:
            optimal = self.multiplications * units * R_Z - self._log2_z_sum
        return MemoryAccounting(
            normal_bits=normal_bits,
            used_bits=(used if self.multiplications else 0) + stored_bits,
            optimal_bits=optimal + stored_bits,
            drains=self.drains,
            multiplications=self.multiplications,
            stored_bits=stored_bits,
        )
