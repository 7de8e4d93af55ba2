"""Parallel text (sentence pairs), its id form, and the padded :class:`TranslationBatch` built from it.

A sentence is kept as its tokenised, lower-cased, space-joined string (what BLEU compares and what predictions
are written as); its tokens are ``sentence.split()``. The ids of a whole split live in two flat tensors with
offsets (like a CSR matrix), so that 200k IWSLT pairs cost a few MB instead of millions of Python ints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import CorpusFormatError
from .vocabulary import BOS, EOS, PAD, TranslationVocabulary


@dataclass(frozen=True)
class ParallelText:
    """Aligned sentence pairs of one split: ``sources[i]`` translates to ``targets[i]``.

    Example::

        >>> text = ParallelText(["a small house", "a very small old house"], ["ein kleines haus", "ein altes haus"])
        >>> len(text), len(text.within(max_len=3))  # the pairs with both sides at most 3 tokens long
        (2, 1)
    """

    sources: list[str]
    """Source sentences, tokenised and space-joined."""
    targets: list[str]
    """Target sentences, tokenised and space-joined."""

    def __post_init__(self) -> None:
        """Refuse unaligned sides."""
        if len(self.sources) != len(self.targets):
            raise ValueError(f"{len(self.sources)} source sentences but {len(self.targets)} target sentences")

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.sources)

    def check_nonempty(self, source: str) -> None:
        """Raise :class:`CorpusFormatError` naming ``source`` and the first pair with an empty side."""
        for i, (src, tgt) in enumerate(zip(self.sources, self.targets)):
            if not src.split() or not tgt.split():
                side = "source" if not src.split() else "target"
                raise CorpusFormatError(
                    f"{source}: pair {i + 1} has an empty {side} sentence (source {src!r}, target {tgt!r}); every "
                    "sentence needs at least one token. The files are truncated, misaligned or not this corpus."
                )

    def empty_pairs(self) -> list[int]:
        """Indices (0-based) of the pairs whose source or target has no token (empty or whitespace only)."""
        return [i for i, (src, tgt) in enumerate(zip(self.sources, self.targets)) if not src.split() or not tgt.split()]

    def empty_side(self, index: int) -> str:
        """``"source"``, ``"target"`` or ``"source and target"``: which side of pair ``index`` has no token."""
        sides = [
            side
            for side, text in (("source", self.sources[index]), ("target", self.targets[index]))
            if not text.split()
        ]
        return " and ".join(sides)

    def without(self, indices: Sequence[int]) -> ParallelText:
        """These pairs minus the pairs ``indices`` (order kept)."""
        drop = set(indices)
        keep = [i for i in range(len(self)) if i not in drop]
        return ParallelText([self.sources[i] for i in keep], [self.targets[i] for i in keep])

    def within(self, max_len: int) -> ParallelText:
        """The pairs whose source and target both have at most ``max_len`` tokens (order kept)."""
        keep = [
            i
            for i, (s, t) in enumerate(zip(self.sources, self.targets))
            if len(s.split()) <= max_len and len(t.split()) <= max_len
        ]
        return ParallelText([self.sources[i] for i in keep], [self.targets[i] for i in keep])


def _flat_ids(sentences: Sequence[str], vocab: TranslationVocabulary) -> tuple[Tensor, Tensor]:
    """All ids of ``sentences`` concatenated, and the offsets ``(N+1,)`` where each sentence starts."""
    ids: list[int] = []
    offsets = [0]
    for sentence in sentences:
        ids.extend(vocab.encode(sentence.split()))
        offsets.append(len(ids))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


@dataclass(frozen=True)
class EncodedPairs:
    """A split in id form: flat id tensors with offsets for each side, and the sentence strings."""

    src_ids: Tensor
    src_offsets: Tensor
    tgt_ids: Tensor
    tgt_offsets: Tensor
    text: ParallelText

    @classmethod
    def encode(
        cls, text: ParallelText, src_vocab: TranslationVocabulary, tgt_vocab: TranslationVocabulary
    ) -> EncodedPairs:
        """Encode ``text`` (unknown words become UNK)."""
        src_ids, src_offsets = _flat_ids(text.sources, src_vocab)
        tgt_ids, tgt_offsets = _flat_ids(text.targets, tgt_vocab)
        return cls(src_ids, src_offsets, tgt_ids, tgt_offsets, text)

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.text)

    @property
    def src_lengths(self) -> Tensor:
        """``(N,)`` source lengths in tokens."""
        return self.src_offsets[1:] - self.src_offsets[:-1]

    @property
    def tgt_lengths(self) -> Tensor:
        """``(N,)`` target lengths in tokens (without BOS/EOS)."""
        return self.tgt_offsets[1:] - self.tgt_offsets[:-1]


@dataclass
class TranslationBatch:
    """One padded batch of sentence pairs, time-major. Lightning moves its tensors to the device.

    Rows are ordered by descending source length (ties: the order the batch plan gave), as packed sequences
    want; :attr:`indices` says which pair of the split each row is. The translation DataModules' loaders yield
    them (built by :func:`collate`).

    Example::

        >>> text = ParallelText(["a", "a b c"], ["x", "y z"])
        >>> src_vocab = TranslationVocabulary.build(s.split() for s in text.sources)
        >>> tgt_vocab = TranslationVocabulary.build(t.split() for t in text.targets)  # x=4, y=5, z=6
        >>> batch = collate(EncodedPairs.encode(text, src_vocab, tgt_vocab), [0, 1])
        >>> len(batch), batch.src.shape, batch.indices  # the longer source first
        (2, torch.Size([3, 2]), [1, 0])
        >>> batch.tgt_in[:, 0].tolist(), batch.tgt_out[:, 0].tolist()  # BOS y z / y z EOS
        ([2, 5, 6], [5, 6, 3])
        >>> batch.tgt_keep[:, 1].tolist(), batch.references
        ([True, True, False], ['y z', 'x'])
    """

    src: Tensor
    """``(S, B)`` int64 source ids (no BOS/EOS), right-padded with PAD."""
    src_keep: Tensor
    """``(S, B)`` bool, True at real source tokens (every sentence has at least one)."""
    tgt_in: Tensor
    """``(T, B)`` int64 decoder inputs ``BOS y1 .. yn``, right-padded with PAD."""
    tgt_out: Tensor
    """``(T, B)`` int64 decoder targets ``y1 .. yn EOS``, right-padded with PAD (the loss ignores PAD)."""
    tgt_keep: Tensor
    """``(T, B)`` bool, True at the ``n + 1`` real target positions of each sentence."""
    sources: list[str]
    """The source sentences, tokenised, lower-cased and space-joined (for predict output)."""
    references: list[str]
    """The target sentences, tokenised, lower-cased and space-joined (for BLEU)."""
    indices: list[int] = field(default_factory=list)
    """Position of each row's pair in its split file (to write predictions in file order)."""

    def __len__(self) -> int:
        """Batch size ``B`` (Lightning's batch-size inference uses it)."""
        return int(self.src.shape[1])

    @property
    def src_lengths(self) -> Tensor:
        """``(B,)`` source lengths (on the batch's device)."""
        return self.src_keep.sum(0)


def _padded(ids: Tensor, starts: Tensor, lengths: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """``(rows, B)`` ids of ``B`` sentences (``ids[starts[b] : starts[b] + lengths[b]]``) padded with PAD, and
    the mask of real positions."""
    t = torch.arange(rows).unsqueeze(1)
    keep = t < lengths.unsqueeze(0)
    gather = (starts.unsqueeze(0) + t).clamp(max=max(ids.numel() - 1, 0))
    values = ids[gather] if ids.numel() else torch.zeros_like(gather)
    return torch.where(keep, values, torch.full_like(values, PAD)), keep


def collate(pairs: EncodedPairs, rows: Sequence[int] | Tensor) -> TranslationBatch:
    """The :class:`TranslationBatch` of the pairs ``rows`` of ``pairs`` (reordered by source length, longest
    first)."""
    index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if index.numel() == 0:
        raise ValueError("a TranslationBatch needs at least one sentence pair")
    src_len = pairs.src_lengths[index]
    index = index[torch.sort(src_len, descending=True, stable=True).indices]
    src_len = pairs.src_lengths[index]
    tgt_len = pairs.tgt_lengths[index]
    src, src_keep = _padded(pairs.src_ids, pairs.src_offsets[index], src_len, int(src_len.max()))
    words, _ = _padded(pairs.tgt_ids, pairs.tgt_offsets[index], tgt_len, int(tgt_len.max()))
    batch = index.numel()
    tgt_in = torch.cat([torch.full((1, batch), BOS, dtype=torch.long), words])
    tgt_out = torch.cat([words, torch.full((1, batch), PAD, dtype=torch.long)])
    tgt_out[tgt_len, torch.arange(batch)] = EOS
    tgt_keep = torch.arange(tgt_out.shape[0]).unsqueeze(1) <= tgt_len.unsqueeze(0)
    order = index.tolist()
    return TranslationBatch(
        src=src,
        src_keep=src_keep,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        tgt_keep=tgt_keep,
        sources=[pairs.text.sources[i] for i in order],
        references=[pairs.text.targets[i] for i in order],
        indices=order,
    )
