"""Final words in as many bytes as they hold (:mod:`lightning_revrnn.core.packing`): round trip bit for bit,
the byte counts at every boundary, what the packed tensors occupy, and an unpack without host reads."""

from __future__ import annotations

import torch
from capture_guard import NoHostRead
from hypothesis import given
from hypothesis import strategies as st

from lightning_revrnn.core.packing import MAX_BYTES, pack_words, packed_byte_counts, unpack_words

WORDS = st.integers(min_value=0, max_value=2**53 - 1)


def _pack(word: torch.Tensor):
    counts = packed_byte_counts(word)
    return pack_words(word, counts, int(counts.long().sum()))


def test_byte_counts_at_the_boundaries() -> None:
    word = torch.tensor([[0, 1, 255, 256, 2**16 - 1, 2**16], [2**48 - 1, 2**48, 2**53 - 1, 7, 2**24, 2**32 - 1]])
    assert packed_byte_counts(word).tolist() == [[0, 1, 1, 2, 2, 3], [6, 7, 7, 1, 4, 4]]
    assert int(packed_byte_counts(torch.tensor([2**53 - 1]))) == MAX_BYTES


@given(st.lists(WORDS, min_size=1, max_size=24), st.integers(min_value=1, max_value=4))
def test_round_trip_bit_for_bit(values: list[int], rows: int) -> None:
    values = (values * rows)[: rows * len(values)]
    word = torch.tensor(values, dtype=torch.int64).view(rows, -1)
    packed = _pack(word)
    assert torch.equal(unpack_words(packed), word)
    assert packed.data.numel() == int(packed_byte_counts(word).long().sum())
    assert packed.bits == 8 * (word.numel() + packed.data.numel())


def test_bytes_are_little_endian_unit_after_unit() -> None:
    packed = _pack(torch.tensor([[0x0102, 0], [0x030405, 0x06]]))
    assert packed.data.tolist() == [0x02, 0x01, 0x05, 0x04, 0x03, 0x06]
    assert packed.counts.tolist() == [[2, 0], [3, 1]]


def test_all_zero_words_pack_to_their_counts() -> None:
    word = torch.zeros(3, 4, dtype=torch.int64)
    packed = _pack(word)
    assert packed.data.numel() == 0 and packed.bits == 8 * 12
    assert torch.equal(unpack_words(packed), word)


def test_unpack_reads_nothing_on_the_host() -> None:
    """The reverse sweep unpacks inside its captured region."""
    word = torch.tensor([[3, 2**40 + 5], [0, 2**20]])
    packed = _pack(word)
    with NoHostRead():
        back = unpack_words(packed)
    assert torch.equal(back, word)
