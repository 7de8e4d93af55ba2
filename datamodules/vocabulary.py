"""The per-language vocabulary of the translation DataModules, with its four special tokens.

Ids ``0..3`` are the specials (:data:`SPECIALS`) in every vocabulary, source and target alike, so a model can
use :data:`PAD`, :data:`UNK`, :data:`BOS` and :data:`EOS` as constants. The other tokens follow by descending
training frequency, ties broken by the token itself, so every process (and every run) builds the same list.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

PAD, UNK, BOS, EOS = 0, 1, 2, 3
"""Special token ids, identical in the source and the target vocabulary."""

SPECIALS: tuple[str, str, str, str] = ("<pad>", "<unk>", "<s>", "</s>")
"""The special tokens, in id order: padding, unknown word, begin and end of sentence."""


class TranslationVocabulary:
    """Token list of one language: ``tokens[i]`` is the token with id ``i``; ``tokens[:4] == SPECIALS``.

    Open vocabulary: :meth:`encode` maps a word it does not hold to :data:`UNK` (evaluation sentences contain
    words never seen in training). :meth:`decode` turns a model's output ids back into words.

    Example::

        >>> vocab = TranslationVocabulary.build([["ein", "hund"], ["ein", "haus"]])
        >>> vocab.tokens  # the specials, then by frequency (ties: alphabetical)
        ['<pad>', '<unk>', '<s>', '</s>', 'ein', 'haus', 'hund']
        >>> vocab.encode(["ein", "katze"])  # an unseen word is UNK
        [4, 1]
        >>> vocab.decode([BOS, 4, 6, EOS, PAD])
        ['ein', 'hund']
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        """Wrap an explicit token list (ids are positions); it must start with :data:`SPECIALS`, tokens unique."""
        itos = list(tokens)
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(
                f"a TranslationVocabulary must start with the special tokens {SPECIALS} (ids 0..3), got "
                f"{itos[: len(SPECIALS)]}; build one with TranslationVocabulary.build(sentences)"
            )
        stoi = {tok: i for i, tok in enumerate(itos)}
        if len(stoi) != len(itos):
            repeated = sorted(tok for tok, n in Counter(itos).items() if n > 1)
            raise ValueError(f"vocabulary tokens must be unique; repeated: {repeated[:10]}")
        self._itos = itos
        self._stoi = stoi

    @classmethod
    def build(
        cls, sentences: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None
    ) -> TranslationVocabulary:
        """The vocabulary of tokenised ``sentences``: :data:`SPECIALS`, then every token seen at least
        ``min_freq`` times, most frequent first (ties: alphabetical), cut to ``max_size`` tokens in all
        (``max_size`` counts the four specials; ``None``: no limit). Tokens spelled like a special are not
        counted (they map to the special itself)."""
        if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be an integer >= 1, got {min_freq!r}")
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < len(SPECIALS)
        ):
            raise ValueError(
                f"max_size must be None or an integer >= {len(SPECIALS)} (it counts the special tokens "
                f"{SPECIALS}), got {max_size!r}"
            )
        counts: Counter[str] = Counter()
        for sentence in sentences:
            counts.update(sentence)
        for special in SPECIALS:
            counts.pop(special, None)
        words = sorted((tok for tok, n in counts.items() if n >= min_freq), key=lambda tok: (-counts[tok], tok))
        if max_size is not None:
            words = words[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        """Number of ids (specials included): the width of an embedding or output layer."""
        return len(self._itos)

    def __getitem__(self, index: int) -> str:
        """The token with id ``index``."""
        return self._itos[index]

    def __contains__(self, token: object) -> bool:
        """Whether ``token`` has an id of its own (not :data:`UNK`)."""
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        """Equal to another vocabulary with the same tokens in the same order."""
        if not isinstance(other, TranslationVocabulary):
            return NotImplemented
        return self._itos == other._itos

    def __hash__(self) -> int:
        """Hash of the token tuple."""
        return hash(tuple(self._itos))

    def __repr__(self) -> str:
        """Size and the first words after the specials."""
        return f"TranslationVocabulary(size={len(self)}, first={self._itos[len(SPECIALS) : len(SPECIALS) + 5]!r})"

    @property
    def tokens(self) -> list[str]:
        """The id-to-token list (a copy)."""
        return list(self._itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens``; a token without an id becomes :data:`UNK`. No BOS/EOS is added."""
        stoi = self._stoi
        return [stoi.get(tok, UNK) for tok in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Tokens of ``ids`` up to the first :data:`EOS` (excluded); :data:`PAD` and :data:`BOS` are dropped,
        :data:`UNK` stays as ``"<unk>"``. Accepts any int sequence (a list or a 1-D tensor's ``tolist()``)."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self._itos[i])
        return out

    def difference(self, other: TranslationVocabulary, names: tuple[str, str] = ("this", "other")) -> str:
        """In words, how this vocabulary differs from ``other`` (for error messages): the sizes, how many ids mean
        another word, and the first such id in each (``names`` label the two); ``""`` when they are equal."""
        if self == other:
            return ""
        mine, theirs = self._itos, other._itos
        shared = min(len(mine), len(theirs))
        moved = [i for i in range(shared) if mine[i] != theirs[i]]
        sizes = (
            f"{names[0]} {len(mine)} tokens, {names[1]} {len(theirs)}"
            if len(mine) != len(theirs)
            else f"both {len(mine)} tokens"
        )
        if not moved:
            return f"{sizes}; the first {shared} ids agree"
        first = moved[0]
        return (
            f"{sizes}; {len(moved)} of the first {shared} ids mean another word, e.g. id {first} is "
            f"{mine[first]!r} in {names[0]} but {theirs[first]!r} in {names[1]}"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this vocabulary: ``{"tokens": [...]}``."""
        return {"tokens": list(self._itos)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TranslationVocabulary:
        """The vocabulary saved by :meth:`state_dict`."""
        return cls(state["tokens"])
