"""Final words and stack depths at the bit level (:mod:`lightning_revrnn.core.packing`): round trip bit for bit,
bit lengths at every boundary, fields across stream words, the layout written out by hand, what the stream
occupies, and pack and unpack without host reads."""

from __future__ import annotations

import torch
from capture_guard import NoHostRead
from hypothesis import given
from hypothesis import strategies as st

from lightning_revrnn.core.packing import (
    LENGTH_BITS,
    STREAM_BITS,
    bit_lengths,
    pack_bits,
    pack_units,
    payload_bits,
    unpack_bits,
    unpack_units,
)

WORDS = st.integers(min_value=0, max_value=2**42 - 1)


def _round_trip(word: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    depth_bits = int(depth.max()).bit_length()
    packed = pack_units(word, depth, depth_bits, int(payload_bits(word)))
    back_word, back_depth = unpack_units(packed)
    return back_word, back_depth, packed.bits


def test_bit_lengths_at_the_boundaries() -> None:
    word = torch.tensor([0, 1, 2, 3, 4, 2**32 - 1, 2**32, 2**41 - 1, 2**41, 2**42 - 1, 2**53 - 1])
    assert bit_lengths(word).tolist() == [0, 1, 2, 2, 3, 32, 33, 41, 42, 42, 53]
    assert int(payload_bits(word)) == sum(max(n - 1, 0) for n in [0, 1, 2, 2, 3, 32, 33, 41, 42, 42, 53])


@given(
    st.lists(st.tuples(WORDS, st.integers(min_value=0, max_value=700)), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=4),
)
def test_round_trip_bit_for_bit(units: list[tuple[int, int]], rows: int) -> None:
    units = (units * rows)[: rows * len(units)]
    word = torch.tensor([w for w, _ in units], dtype=torch.int64).view(rows, -1)
    depth = torch.tensor([d for _, d in units], dtype=torch.int64).view(rows, -1)
    back_word, back_depth, bits = _round_trip(word, depth)
    assert torch.equal(back_word, word) and torch.equal(back_depth, depth)
    used = word.numel() * (LENGTH_BITS + int(depth.max()).bit_length()) + int(payload_bits(word))
    assert bits == 64 * -(-used // STREAM_BITS)  # whole int64s, 63 stream bits each


def test_layout_by_hand() -> None:
    """Two units, no drains (0 depth bits): headers 3 and 1 (6 bits each, at bits 0 and 6), then 5 = 0b101 without
    its leading one (2 bits, 0b01, at bit 12) and 1 = 0b1 (0 bits)."""
    packed = pack_units(torch.tensor([[5, 1]]), torch.zeros(1, 2, dtype=torch.int64), 0, 2)
    assert packed.stream.tolist() == [3 | 1 << 6 | 0b01 << 12] and packed.bits == 64


def test_fields_across_stream_words() -> None:
    """Fields of up to 62 bits starting at every offset of a 63-bit stream word come back bit for bit."""
    torch.manual_seed(0)
    lengths = torch.randint(0, 63, (300,))
    values = torch.randint(0, 2**62, (300,)) & ((1 << lengths) - 1)
    starts = lengths.cumsum(0) - lengths
    stream = pack_bits(values, lengths, starts, int(lengths.sum()))
    assert bool((stream >= 0).all()), "no stream word uses its sign bit"
    assert torch.equal(unpack_bits(stream, lengths, starts), values)


def test_zero_words_cost_their_headers_only() -> None:
    word = torch.zeros(3, 4, dtype=torch.int64)
    back_word, back_depth, bits = _round_trip(word, torch.zeros_like(word))
    assert torch.equal(back_word, word) and not bool(back_depth.any())
    assert bits == 128  # 12 headers of 6 bits: 72 bits, two stream words of 63


def test_pack_and_unpack_read_nothing_on_the_host() -> None:
    """The window's end packs with the sizes read once; the reverse sweep unpacks inside its captured region."""
    word = torch.tensor([[3, 2**40 + 5], [0, 2**20]])
    depth = torch.tensor([[0, 3], [1, 0]])
    payload = int(payload_bits(word))
    with NoHostRead():
        back_word, back_depth = unpack_units(pack_units(word, depth, 2, payload))
    assert torch.equal(back_word, word) and torch.equal(back_depth, depth)
