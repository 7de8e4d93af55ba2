"""The information buffer: where a layer keeps the bits that forgetting destroys (spec sections 3-4).

Each layer owns one int64 *word* per (batch, hidden/2) unit, shared by all of its multiplications; a word must
stay below ``2^(63 - R_Z)`` before a multiplication. Instead of snapshotting every word when one nears the
limit (the reference code), the buffer *drains* example by example: at every check point (every
:func:`check_period` multiplications) each example whose largest word has more than ``DRAIN_BITS`` bits moves
the low 32 bits of its words into an int32 plane row. The rule reads one example's own words only, so an
example computes bit for bit the same alone, in a batch or on any DDP rank.

The forward decides drains on the device and never waits: check points queue dense planes and masks
(:class:`PendingDrain`), and :meth:`InformationBuffer.finish` compacts them with one host read per window; in
the same read :meth:`InformationBuffer.pack` learns how many bytes the final words hold and keeps them so
(:mod:`~lightning_revrnn.core.packing`) until the reverse sweep unpacks them.
The reverse sweep replays each drain for exactly the examples that drained, so the buffer is empty again
(every word zero, no plane) after a full sweep. docs/design.md has the proof that no word overflows and the
memory this costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.fixed_point import R_Z, bits_per_multiply, reversible_divide, reversible_multiply
from lightning_revrnn.core.packing import PackedWords, pack_words, packed_byte_counts, unpack_words

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
class PendingDrain:
    """One check point decided on the device and not yet compacted (see :meth:`InformationBuffer.finish`).

    ``before``: the index of the multiplication the check point preceded; ``plane``: int32
    ``(batch, hidden_size // 2)``, the low 32 bits of every example's words (offset into int32), drained or
    not; ``drained``: bool ``(batch,)``, which examples drained.
    """

    before: int
    plane: Tensor
    drained: Tensor


class InformationBuffer:
    """Per-layer exact store of forgotten bits, growing as needed and emptied by the reverse sweep.

    Args:
        shape: ``(batch, hidden_size // 2)``: one word per unit of a half state.
        device: where the words live.
        max_forget_bits: the cell's ``k`` (``None``: up to ``R_Z`` bits per multiplication).
        retain: keep drained planes (training). Without it (evaluation) drained bits are dropped and no
            drain is recorded, so memory stays ``O(batch·H)`` and the forward never synchronises; the
            arithmetic, drains included, is identical.

    The forward (:meth:`multiply`) decides drains on the device and queues them as :class:`PendingDrain`
    records; :meth:`finish` (once at the end of a window's forward) compacts them with one host read.
    The compacted drain records are four parallel lists, one entry per check point at which some example
    drained: :attr:`drained_before` (the index of the multiplication the drain preceded),
    :attr:`drained_rows` (row indices on the device in :func:`row_index_dtype`, ``None`` when every example
    drained), :attr:`drained_counts` (how many examples drained) and :attr:`planes` (int32,
    ``(drained examples, hidden_size // 2)``). Every reader of them (these properties, :meth:`divide`,
    :meth:`stats`, :meth:`tensors`) calls :meth:`finish` first, so none ever sees a half-compacted buffer;
    after :meth:`finish` has run they read no device value. ``syncs`` counts the host reads of the forward
    (at most one per :meth:`finish` with pending records).

    Example::

        >>> from lightning_revrnn.core.fixed_point import to_fixed
        >>> buf = InformationBuffer((2, 3), torch.device("cpu"), max_forget_bits=3, retain=True)
        >>> h = to_fixed(torch.randn(2, 3))
        >>> z = torch.full((2, 3), 700)  # z* = 700/1024: about 0.55 bits forgotten per unit
        >>> back = buf.divide(buf.multiply(h, z), z)
        >>> torch.equal(back, h), buf.is_empty()
        (True, True)
    """

    def __init__(self, shape: tuple[int, int], device: torch.device, max_forget_bits: int | None, retain: bool) -> None:
        self._word: Tensor | None = torch.zeros(shape, dtype=torch.int64, device=device)
        self._packed: PackedWords | None = None  # the words between forward and reverse (see pack)
        self.retain = retain
        self.pending: list[PendingDrain] = []
        self._planes: list[Tensor] = []
        self._drained_before: list[int] = []
        self._drained_rows: list[Tensor | None] = []
        self._drained_counts: list[int] = []
        self.multiplications = 0
        self.syncs = 0
        self._step_bits = bits_per_multiply(max_forget_bits)
        self._period = check_period(max_forget_bits)
        self._bound = 0  # every word is < 2^_bound (host-side, never read from the device)
        #: Σ log2 z* per unit (float64) since the last :meth:`stats` (retaining only): the optimal bits' source.
        self.log2_z_units: Tensor | None = None
        self._log2_z_sum: Tensor | None = None  # Σ log2 z* over units, up to the last stats()

    @property
    def word(self) -> Tensor:
        """The int64 words (unpacked first if :meth:`pack` packed them)."""
        if self._word is None:
            assert self._packed is not None
            self._word, self._packed = unpack_words(self._packed), None
        return self._word

    @word.setter
    def word(self, value: Tensor) -> None:
        self._word, self._packed = value, None

    def packed_size(self) -> Tensor:
        """End of a window's forward: how many bytes :meth:`pack` will store the words in (int64 ``(1,)`` on the
        device, for the caller's one host read; empty without ``retain``: nothing to keep)."""
        if not self.retain:
            return self.word.new_zeros(0)
        return packed_byte_counts(self.word).long().sum().reshape(1)

    def pack(self, total: int) -> None:
        """Keep the words in the bytes they hold until the reverse sweep (``total``: the value of
        :meth:`packed_size`, read on the host). :attr:`word` unpacks them again."""
        self._packed, self._word = pack_words(self.word, packed_byte_counts(self.word), total), None

    # ------------------------------------------------------------------------------------ forward
    def multiply(self, h: Tensor, z: Tensor) -> Tensor:
        """Forward: ``h* ← h*·z*/2^R_Z``, pushing the lost bits (after a check point's drains). No host read.
        The reference arithmetic; a fast backend does the same through :meth:`begin_multiply` /
        :meth:`end_multiply` around its own kernel."""
        h, word = reversible_multiply(h, z, self.begin_multiply())
        if self.retain:  # the optimal bits: log2 z* per unit (float64), summed over units by stats()
            log2_z = torch.log2(z)  # float32 (NaN where z* came from NaN gates: the range guard reports those)
            self.log2_z_units = log2_z.double() if self.log2_z_units is None else self.log2_z_units + log2_z
        self.end_multiply(word)
        return h

    def begin_multiply(self) -> Tensor:
        """Before a multiplication: run the check point's drains if one falls here, and return the word to
        multiply with. A backend then calls :meth:`end_multiply` with the new word (and, when retaining, adds
        ``log2 z*`` per unit into :attr:`log2_z_units`)."""
        self._check_point()
        return self.word

    def end_multiply(self, word: Tensor) -> None:
        """After a multiplication: keep its new word and count it."""
        self.word = word
        self._bound += self._step_bits
        self.multiplications += 1

    def _check_point(self) -> None:
        """Before a multiplication: a check point's drains when one falls here and a word may need it."""
        if self.multiplications % self._period == 0 and self._bound > DRAIN_BITS:
            self._drain_full_examples()

    def _drain_full_examples(self) -> None:
        """A check point on the device: every example whose largest word exceeds 32 bits drains."""
        drained = self.word.amax(1) > _DRAIN_MASK
        if self.retain:
            plane = ((self.word & _DRAIN_MASK) - _DRAIN_OFFSET).to(torch.int32)
            self.pending.append(PendingDrain(self.multiplications, plane, drained))
        self.word = torch.where(drained[:, None], self.word >> DRAIN_BITS, self.word)
        self._bound = DRAIN_BITS

    def drain_counts(self) -> Tensor:
        """How many examples drained at each pending check point: int64 on the device, for :meth:`finish`
        (so a caller can read several buffers' counts, and anything else, in one host read)."""
        if not self.pending:
            return self.word.new_zeros(0)
        return torch.stack([p.drained for p in self.pending]).sum(1)

    def finish(self, counts: list[int] | None = None) -> None:
        """End of a window's forward: compact the pending drains into the stored records.

        One host read for all pending check points (how many examples drained at each), unless the caller
        read :meth:`drain_counts` itself and passes them as ``counts``; none when nothing is pending
        (evaluation, or no check point ran on the device). A check point where every
        example drained keeps its dense plane as is; one where some drained keeps their rows (in
        ascending order, selected on the device) and their indices; one where none drained is dropped.
        Idempotent: a second call finds nothing pending. Multiplications may follow (their check points
        wait for the next call).
        """
        if not self.pending:
            return
        masks = torch.stack([p.drained for p in self.pending])
        if counts is None:
            counts = masks.sum(1).tolist()  # the forward's one synchronisation
        self.syncs += 1
        batch = masks.shape[1]
        # Per check point, the drained rows first, each group in ascending order (a stable sort of 0/1 keys).
        order = torch.argsort((~masks).to(torch.int8), dim=1, stable=True)
        for record, count, rows in zip(self.pending, counts, order):
            if count == 0:
                continue
            if count == batch:
                self._record(record.before, record.plane, None, count)
            else:
                rows = rows[:count]
                self._record(record.before, record.plane.index_select(0, rows), rows.to(row_index_dtype(batch)), count)
        self.pending = []

    def _record(self, before: int, plane: Tensor, rows: Tensor | None, count: int) -> None:
        self._drained_before.append(before)
        self._planes.append(plane)
        self._drained_rows.append(rows)
        self._drained_counts.append(count)

    # ---------------------------------------------------------------------------- drain records
    @property
    def planes(self) -> list[Tensor]:
        """The drained plane rows per drain record (int32, ``(drained examples, hidden_size // 2)``)."""
        self.finish()
        return self._planes

    @property
    def drained_before(self) -> list[int]:
        """Per drain record, the index of the multiplication the drain preceded."""
        self.finish()
        return self._drained_before

    @property
    def drained_rows(self) -> list[Tensor | None]:
        """Per drain record, the drained rows (:func:`row_index_dtype`), or ``None`` when all drained."""
        self.finish()
        return self._drained_rows

    @property
    def drained_counts(self) -> list[int]:
        """Per drain record, how many examples drained."""
        self.finish()
        return self._drained_counts

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

    def end_divide(self, word: Tensor) -> None:
        """After undoing a multiplication: keep the restored word, and replay the drain that preceded the
        multiplication, if one did."""
        self.word = word
        if self._drained_before and self._drained_before[-1] == self.multiplications:
            self._undo_drain()

    def _undo_drain(self) -> None:
        self._drained_before.pop()
        self._drained_counts.pop()
        stored = self._drained_rows.pop()
        rows = None if stored is None else stored.long()
        low = self._planes.pop().to(torch.int64) + _DRAIN_OFFSET
        words = self.word if rows is None else self.word.index_select(0, rows)
        restored = (words << DRAIN_BITS) | low
        self.word = restored if rows is None else self.word.index_copy(0, rows, restored)

    def is_empty(self) -> bool:
        """True once a reverse sweep has undone every multiplication: no record left, every word zero."""
        return (
            not self.pending
            and not self._planes
            and not self._drained_before
            and self.multiplications == 0
            and not bool(self.word.any())
        )

    # ---------------------------------------------------------------------------------- accounting
    def tensors(self) -> list[Tensor]:
        """What must live until the reverse sweep: the planes, the drains' row indices and the current
        words (after :meth:`finish`, which this calls)."""
        self.finish()
        words = [self._packed.counts, self._packed.data] if self._packed is not None else [self.word]
        return [*self._planes, *[r for r in self._drained_rows if r is not None], *words]

    def stats(self, normal_bits: int, stored_bits: int = 0) -> MemoryAccounting:
        """The window's accounting (after :meth:`finish`, which this calls); see
        :class:`~lightning_revrnn.core.accounting.MemoryAccounting`.
        ``stored_bits``: the layer's stored units, added to ``used_bits`` and ``optimal_bits``."""
        self.finish()
        units = self._packed.counts.numel() if self._packed is not None else self.word.numel()
        word_bits = self._packed.bits if self._packed is not None else units * 64
        optimal: float | Tensor = 0.0
        if self.log2_z_units is not None:  # fold into one number: no per-unit tensor lives on
            total = self.log2_z_units.sum()
            self._log2_z_sum = total if self._log2_z_sum is None else self._log2_z_sum + total
            self.log2_z_units = None
        if self._log2_z_sum is not None:
            optimal = self.multiplications * units * R_Z - self._log2_z_sum
        plane_bits = sum(p.numel() for p in self._planes) * DRAIN_BITS
        index_bits = sum(r.numel() * r.element_size() * 8 for r in self._drained_rows if r is not None)
        used = plane_bits + index_bits + word_bits + self.multiplications
        return MemoryAccounting(
            normal_bits=normal_bits,
            used_bits=(used if self.multiplications else 0) + stored_bits,
            optimal_bits=optimal + stored_bits,
            drains=sum(self._drained_counts),
            multiplications=self.multiplications,
            stored_bits=stored_bits,
        )
