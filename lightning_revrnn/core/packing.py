"""Final buffer words stored in as many bytes as they hold.

After a window's forward every unit's buffer word (int64, ``0 ≤ word < 2^53``) holds only the bits forgotten
since its example's last drain: on short windows or lightly forgetting units a few bits, far from 64. The
buffer keeps them, from the end of the forward to the start of the reverse sweep, as :class:`PackedWords`: each
word's significant bytes (little-endian, unit after unit) and how many there are (0-7, one byte per unit).

:func:`packed_byte_counts` runs on the device; the caller reads their sum with the window's one host read and
passes it to :func:`pack_words`. :func:`unpack_words` gathers the words back with fixed-shape operations only
(no host read), so the reverse sweep stays capture-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: A word has fewer than 53 significant bits, so at most 7 bytes.
MAX_BYTES = 7


@dataclass(frozen=True)
class PackedWords:
    """``counts``: uint8 ``(batch, units)``, the bytes each word holds; ``data``: uint8 ``(Σ counts,)``, each
    word's low bytes first, in row-major unit order."""

    counts: Tensor
    data: Tensor

    @property
    def bits(self) -> int:
        """What the two tensors occupy."""
        return 8 * (self.counts.numel() + self.data.numel())


def packed_byte_counts(word: Tensor) -> Tensor:
    """How many bytes each word needs (uint8, 0 for a zero word): the number of ``i`` with ``word ≥ 256^i``."""
    counts = torch.zeros(word.shape, dtype=torch.uint8, device=word.device)
    for i in range(MAX_BYTES):
        counts += word >= (1 << (8 * i))
    return counts


def _byte_planes(word: Tensor) -> Tensor:
    """``(…, MAX_BYTES)``: byte ``i`` of every word at index ``i``."""
    shifts = torch.arange(0, 8 * MAX_BYTES, 8, device=word.device)
    return (word[..., None] >> shifts) & 0xFF


def pack_words(word: Tensor, counts: Tensor, total: int) -> PackedWords:
    """The words' significant bytes (``counts`` from :func:`packed_byte_counts`, ``total`` their sum, read on
    the host by the caller: the buffer folds it into the window's one read). Fixed-shape scatter: no read here."""
    counts_long = counts.long()
    starts = counts_long.flatten().cumsum(0).view(counts.shape) - counts_long
    byte = torch.arange(MAX_BYTES, device=word.device)
    # every byte plane goes to its place, the bytes a word does not need to one slot past the end
    where = torch.where(byte < counts_long[..., None], starts[..., None] + byte, total)
    data = torch.empty(total + 1, dtype=torch.uint8, device=word.device)
    data.scatter_(0, where.flatten(), _byte_planes(word).to(torch.uint8).flatten())
    return PackedWords(counts, data[:total].clone())


def unpack_words(packed: PackedWords) -> Tensor:
    """The int64 words back, bit for bit, by fixed-shape gathers (no host read)."""
    counts = packed.counts.long()
    ends = counts.flatten().cumsum(0).view(counts.shape)
    starts = ends - counts
    word = torch.zeros(counts.shape, dtype=torch.int64, device=counts.device)
    if packed.data.numel() == 0:
        return word
    last = packed.data.numel() - 1
    for i in range(MAX_BYTES):
        byte = packed.data[(starts + i).clamp(max=last)].long()
        word |= torch.where(i < counts, byte, 0) << (8 * i)
    return word
