"""A buffer's final words and stack depths stored at the bit level between a window's forward and reverse.

After a window's forward every unit has a word (int64, ``0 ≤ word < 2^42``: the bits forgotten since its last
drain) and a stack depth (how many 32-bit slots it drained). Both are kept, from the end of the forward to the
start of the reverse sweep, in one int64 bit stream (:class:`PackedWords`):

- a fixed-width header per unit, in unit order: the word's bit length ``n`` (:data:`LENGTH_BITS` bits), then
  its depth (``depth_bits`` bits, the fewest that hold the window's largest depth; 0 when nothing drained);
- then each word's bits below its leading one (``n - 1`` bits; the leading one is implied by ``n``), unit
  after unit.

The headers sit at fixed places, so the reverse sweep reads all of them at once and finds every word's place
by a cumulative sum: :func:`pack_units` and :func:`unpack_units` use fixed-shape scatters and gathers only
(no host read). The caller reads the payload's total bits with the window's one host read
(:func:`payload_bits`) and passes it to :func:`pack_units`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Bits of a header's length field: a word at rest has at most 42 significant bits.
LENGTH_BITS = 6
#: Bits of the stream held per int64 (the sign bit stays 0).
STREAM_BITS = 63
_STREAM_MASK = (1 << STREAM_BITS) - 1


@dataclass(frozen=True)
class PackedWords:
    """``stream``: int64, the headers and then the words' bits (bit ``i`` of the stream is bit ``i % 63`` of
    ``stream[i // 63]``); ``shape``: the words' ``(batch, units)``; ``depth_bits``: the width of a header's
    depth field."""

    stream: Tensor
    shape: tuple[int, int]
    depth_bits: int

    @property
    def bits(self) -> int:
        """What the stream occupies."""
        return 64 * self.stream.numel()


def bit_lengths(word: Tensor) -> Tensor:
    """Each word's significant bits (int64; 0 for a zero word). Exact: a word below 2^53 is exact in float64."""
    return torch.frexp(word.double()).exponent.long()


def payload_bits(word: Tensor) -> Tensor:
    """On the device, int64 ``(1,)``: the bits the words occupy below their leading ones (for the host read)."""
    return (bit_lengths(word) - 1).clamp(min=0).sum().reshape(1)


def pack_bits(values: Tensor, lengths: Tensor, starts: Tensor, total_bits: int) -> Tensor:
    """``values[i]`` (``0 ≤ values[i] < 2^lengths[i]``, ``lengths ≤ 62``) written at bit ``starts[i]`` of a stream
    of ``total_bits`` bits, :data:`STREAM_BITS` per int64 (so no stream word is negative and shifts are logical);
    the fields must not overlap. A field spans at most two stream words: its low part is added into the first
    and its high part into the next (disjoint bits: adding is or-ing)."""
    words = -(-total_bits // STREAM_BITS)
    # + 2: where the empty parts of fields ending at the stream's end land
    stream = torch.zeros(words + 2, dtype=torch.int64, device=values.device)
    index, shift = starts // STREAM_BITS, starts % STREAM_BITS
    stream.scatter_add_(0, index, (values << shift) & _STREAM_MASK)
    stream.scatter_add_(0, index + 1, values >> (STREAM_BITS - shift))
    return stream[:words].clone()


def unpack_bits(stream: Tensor, lengths: Tensor, starts: Tensor) -> Tensor:
    """The values :func:`pack_bits` wrote at ``starts`` with ``lengths`` (int64, by gathers)."""
    if stream.numel() == 0:
        return torch.zeros_like(starts)
    index, shift = starts // STREAM_BITS, starts % STREAM_BITS
    low = stream[index.clamp(max=stream.numel() - 1)] >> shift
    high = stream[(index + 1).clamp(max=stream.numel() - 1)] << (STREAM_BITS - shift)
    return (low | high) & ((1 << lengths) - 1)


def pack_units(word: Tensor, depth: Tensor, depth_bits: int, payload: int) -> PackedWords:
    """Pack the words and depths (``payload``: the value of :func:`payload_bits`, read on the host;
    ``depth_bits``: enough bits for the largest depth). Fixed-shape scatter: no read here."""
    n = bit_lengths(word).flatten()
    units = n.numel()
    header_bits = LENGTH_BITS + depth_bits
    header = n | (depth.flatten() << LENGTH_BITS)
    body_lengths = (n - 1).clamp(min=0)
    body = torch.where(n > 0, word.flatten() - (1 << body_lengths), 0)
    body_starts = units * header_bits + body_lengths.cumsum(0) - body_lengths
    header_starts = torch.arange(units, device=word.device) * header_bits
    values = torch.cat([header, body])
    lengths = torch.cat([torch.full_like(n, header_bits), body_lengths])
    stream = pack_bits(values, lengths, torch.cat([header_starts, body_starts]), units * header_bits + payload)
    return PackedWords(stream, (word.shape[0], word.shape[1]), depth_bits)


def unpack_units(packed: PackedWords) -> tuple[Tensor, Tensor]:
    """The words and depths back (int64, bit for bit), by fixed-shape gathers (no host read)."""
    units = packed.shape[0] * packed.shape[1]
    header_bits = LENGTH_BITS + packed.depth_bits
    device = packed.stream.device
    header_starts = torch.arange(units, device=device) * header_bits
    header = unpack_bits(packed.stream, torch.full_like(header_starts, header_bits), header_starts)
    n, depth = header & ((1 << LENGTH_BITS) - 1), header >> LENGTH_BITS
    body_lengths = (n - 1).clamp(min=0)
    body_starts = units * header_bits + body_lengths.cumsum(0) - body_lengths
    body = unpack_bits(packed.stream, body_lengths, body_starts)
    word = torch.where(n > 0, body | (1 << body_lengths), 0)
    return word.view(packed.shape), depth.view(packed.shape)
