"""Word-level corpora: tokenising, the closed vocabulary, and cutting a token stream into parallel streams.

Conventions (those of the PyTorch word-language-model example and of Zaremba et al.): a line's tokens are
its whitespace-separated words followed by one ``<eos>``; an empty line contributes ``<eos>`` alone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import torch

from .errors import CorpusFormatError, UnknownTokenError

EOS = "<eos>"
"""End-of-line token appended to every line."""


def decode_utf8(data: bytes, source: str) -> str:
    """Decode ``data`` as strict UTF-8; on failure name ``source``, the byte offset and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start : err.end].hex(" ")
        raise CorpusFormatError(
            f"{source}: invalid UTF-8 at byte offset {err.start} (line {line}, bytes {bad}: {err.reason}). "
            "The file is corrupt or not a text corpus; delete it and download it again."
        ) from None


def split_lines(text: str) -> list[str]:
    """Split on ``\\n`` only (not on the other characters :meth:`str.splitlines` treats as breaks).

    A final newline does not start an extra line; a last line without a newline still counts.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def tokenize(text: str) -> list[str]:
    """Tokens of ``text``: each line's whitespace-separated words, then :data:`EOS`."""
    tokens: list[str] = []
    for line in split_lines(text):
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def tokenize_bytes(data: bytes, source: str) -> list[str]:
    """Decode and tokenise a split's raw bytes; ``source`` (usually the path) names it in errors.

    Raises:
        CorpusFormatError: invalid UTF-8, or a split without a single word.
    """
    tokens = tokenize(decode_utf8(data, source))
    if all(tok == EOS for tok in tokens):
        raise CorpusFormatError(
            f"{source}: the split is empty ({len(data)} bytes, no words). "
            "The file is truncated or corrupt; delete it and download it again."
        )
    return tokens


def read_tokens(path: str | Path) -> list[str]:
    """Read and tokenise one split file (see :func:`tokenize_bytes`)."""
    path = Path(path)
    return tokenize_bytes(path.read_bytes(), str(path))


class Vocabulary(Sequence[str]):
    """A closed, deterministic word list: ``vocab[i]`` is a token, ``vocab.index(token)`` its id.

    Built from the training tokens sorted by descending frequency, ties broken by the token itself, so that
    every process builds the identical list. :data:`EOS` is always included.

    Closed: :meth:`encode` raises :class:`~.errors.UnknownTokenError` for a token it does not hold (the word-level
    corpora map rare words to ``<unk>`` themselves).

    Example::

        >>> vocab = Vocabulary.build(tokenize("the cat\\nthe dog\\n"))
        >>> vocab.itos  # most frequent first; ties ("<eos>" and "the", "cat" and "dog") by the token
        ['<eos>', 'the', 'cat', 'dog']
        >>> vocab.encode(["the", "dog", "<eos>"])
        tensor([1, 3, 0])
        >>> len(vocab), vocab.eos_index, "bird" in vocab
        (4, 0, False)
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        """Wrap an explicit token list (ids are positions); tokens must be unique."""
        self._itos: list[str] = list(tokens)
        self._stoi: dict[str, int] = {tok: i for i, tok in enumerate(self._itos)}
        if len(self._stoi) != len(self._itos):
            raise ValueError("vocabulary tokens must be unique")

    @classmethod
    def build(cls, tokens: Iterable[str], *, add_eos: bool = True) -> Vocabulary:
        """Vocabulary of ``tokens``, most frequent first (ties: lexicographic), plus :data:`EOS` if asked."""
        counts = Counter(tokens)
        if add_eos:
            counts.setdefault(EOS, 0)
        return cls(sorted(counts, key=lambda tok: (-counts[tok], tok)))

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        """Token(s) at ``index``."""
        return self._itos[index]

    def __len__(self) -> int:
        """Number of tokens."""
        return len(self._itos)

    def __iter__(self) -> Iterator[str]:
        """Tokens in id order."""
        return iter(self._itos)

    def __contains__(self, token: object) -> bool:
        """Whether ``token`` is in the vocabulary (O(1))."""
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        """Equal to another vocabulary (or list) with the same tokens in the same order."""
        if isinstance(other, Vocabulary):
            return self._itos == other._itos
        if isinstance(other, list):
            return self._itos == other
        return NotImplemented

    def __hash__(self) -> int:
        """Hash of the token tuple."""
        return hash(tuple(self._itos))

    def __repr__(self) -> str:
        """Short description."""
        return f"Vocabulary(size={len(self)}, first={self._itos[:5]!r})"

    def index(self, token: str, start: int = 0, stop: int | None = None) -> int:
        """Id of ``token`` (O(1)); :class:`ValueError` if absent."""
        try:
            i = self._stoi[token]
        except KeyError:
            raise ValueError(f"{token!r} is not in the vocabulary") from None
        if i < start or (stop is not None and i >= stop):
            raise ValueError(f"{token!r} is not in the vocabulary range [{start}, {stop})")
        return i

    @property
    def stoi(self) -> dict[str, int]:
        """Token-to-id mapping (a copy)."""
        return dict(self._stoi)

    @property
    def itos(self) -> list[str]:
        """Id-to-token list (a copy)."""
        return list(self._itos)

    @property
    def eos_index(self) -> int | None:
        """Id of :data:`EOS`, or ``None`` for a vocabulary without it."""
        return self._stoi.get(EOS)

    def encode(self, tokens: Sequence[str], source: str = "<tokens>") -> torch.Tensor:
        """Ids of ``tokens`` as a 1-D ``int64`` tensor.

        Raises:
            UnknownTokenError: a token is not in the vocabulary (the vocabulary is closed); the message names
                ``source``, the first unknown token, its line and how many distinct tokens are unknown.
        """
        stoi = self._stoi
        ids = [stoi.get(tok, -1) for tok in tokens]
        if -1 in ids:
            unknown = sorted({tok for tok in tokens if tok not in stoi})
            first = ids.index(-1)
            line = sum(1 for tok in tokens[:first] if tok == EOS) + 1
            shown = ", ".join(repr(t) for t in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UnknownTokenError(
                f"{source}: {len(unknown)} distinct token(s) are not in the training vocabulary "
                f"(first {tokens[first]!r} at line {line}; all: {shown}). The vocabulary is closed: "
                "evaluation splits may only use training tokens (map rare words to '<unk>' as PTB and "
                "WikiText-2 do), or the split files come from different corpora/versions."
            )
        return torch.tensor(ids, dtype=torch.long)


def batchify(ids: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``num_streams`` contiguous streams, time-major ``(L, num_streams)``.

    Stream ``j`` is ``ids[j*L:(j+1)*L]`` with ``L = len(ids) // num_streams``; the remainder is dropped.
    """
    if ids.dim() != 1:
        raise ValueError(f"batchify expects a 1-D token stream, got shape {tuple(ids.shape)}")
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    length = ids.numel() // num_streams
    return ids[: length * num_streams].view(num_streams, length).t().contiguous()
