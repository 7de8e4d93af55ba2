"""IWSLT (WIT3) text: the tagged training files, the XML dev/test sets, Moses tokenisation and its cache.

WIT3 ships training text as ``train.tags.<pair>.<lang>``: one sentence per line, interleaved with metadata lines
such as ``<url>``, ``<talkid>``, ``<keywords>``, ``<title>``, ``<description>``; dev/test sets as XML with the
sentences in ``<seg id="N">`` elements. Sentences are Moses-tokenised (sacremoses, no aggressive dash splits,
no escaping of special characters) and lower-cased, as the paper's OpenNMT preprocessing did. Tokenising the
~200k training pairs takes about half a minute, so the result is cached in a text file whose name carries a
digest of the raw input and of the tokeniser settings: a changed input or tokeniser never reuses it.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from sacremoses import MosesTokenizer

from .corpus import decode_utf8, split_lines
from .download import _atomic_write
from .errors import CorpusFormatError
from .parallel import ParallelText

TOKENIZER_SETTINGS = "sacremoses {} aggressive_dash_splits=False escape=False lowercase-after".format(
    version("sacremoses")
)
"""What the tokenised text depends on besides the input (part of the cache key)."""


def parse_segments(data: bytes, source: str) -> list[tuple[str, str, str]]:
    """``(docid, seg id, text)`` of every ``<seg>`` of a WIT3 XML file, in order; text stripped, entities
    decoded, inner whitespace collapsed."""
    try:
        root = ET.fromstring(decode_utf8(data, source))
    except ET.ParseError as err:
        raise CorpusFormatError(
            f"{source}: not well-formed XML ({err}); the file is truncated or corrupt, delete it and get it again."
        ) from None
    segments = []
    for doc in root.iter("doc"):
        for seg in doc.iter("seg"):
            segments.append((doc.get("docid", ""), seg.get("id", ""), " ".join((seg.text or "").split())))
    if not segments:
        raise CorpusFormatError(f"{source}: no <seg> elements; this is not a WIT3 dev/test file.")
    return segments


def aligned_segments(src: bytes, tgt: bytes, src_name: str, tgt_name: str) -> tuple[list[str], list[str]]:
    """The sentences of two XML files of one dev/test set, checked to pair up (same documents and seg ids)."""
    src_segs, tgt_segs = parse_segments(src, src_name), parse_segments(tgt, tgt_name)
    src_keys, tgt_keys = [s[:2] for s in src_segs], [t[:2] for t in tgt_segs]
    if src_keys != tgt_keys:
        first = next(
            (i for i, (a, b) in enumerate(zip(src_keys, tgt_keys)) if a != b), min(len(src_keys), len(tgt_keys))
        )
        raise CorpusFormatError(
            f"{src_name} and {tgt_name} do not pair up: {len(src_keys)} vs {len(tgt_keys)} segments, first "
            f"difference at segment {first + 1}. They must be the two sides of the same dev/test set."
        )
    return [s[2] for s in src_segs], [t[2] for t in tgt_segs]


def is_tag_line(line: str) -> bool:
    """Whether a training line is WIT3 metadata (``<url>``, ``<talkid>``, ...) rather than a sentence."""
    return line.lstrip().startswith("<")


def training_sentences(src: bytes, tgt: bytes, src_name: str, tgt_name: str) -> tuple[list[str], list[str]]:
    """The sentence pairs of two ``train.tags`` files: metadata lines and empty lines dropped (pairwise, so the
    sides stay aligned), whitespace stripped."""
    src_lines = split_lines(decode_utf8(src, src_name))
    tgt_lines = split_lines(decode_utf8(tgt, tgt_name))
    if len(src_lines) != len(tgt_lines):
        raise CorpusFormatError(
            f"{src_name} has {len(src_lines)} lines but {tgt_name} has {len(tgt_lines)}; the training files "
            "must be aligned line by line. Get both from the same WIT3 archive."
        )
    keep = [
        (s.strip(), t.strip())
        for s, t in zip(src_lines, tgt_lines)
        if s.strip() and t.strip() and not is_tag_line(s) and not is_tag_line(t)
    ]
    return [s for s, _ in keep], [t for _, t in keep]


def moses_tokenize(sentences: list[str], lang: str) -> list[str]:
    """Each sentence Moses-tokenised for ``lang`` (sacremoses; no aggressive dash splits, no escaping),
    lower-cased and space-joined."""
    tokenizer = MosesTokenizer(lang=lang)
    return [
        " ".join(tokenizer.tokenize(s, aggressive_dash_splits=False, escape=False, return_str=True).lower().split())
        for s in sentences
    ]


def tokenized_pairs(sources: list[str], targets: list[str], src_lang: str, tgt_lang: str) -> ParallelText:
    """Tokenised, lower-cased pairs; a pair with a side that tokenises to nothing is dropped."""
    src_tok, tgt_tok = moses_tokenize(sources, src_lang), moses_tokenize(targets, tgt_lang)
    keep = [i for i, (s, t) in enumerate(zip(src_tok, tgt_tok)) if s and t]
    return ParallelText([src_tok[i] for i in keep], [tgt_tok[i] for i in keep])


def user_cache_dir(subdir: str) -> Path:
    """``<$XDG_CACHE_HOME or ~/.cache>/lightning-revrnn/<subdir>`` (not ``$REVRNN_DATA_DIR``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "lightning-revrnn" / subdir


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def cache_key(input_digest: str) -> str:
    """16 hex digits identifying tokenised text: the raw input's digest and :data:`TOKENIZER_SETTINGS`."""
    return hashlib.sha256(f"{input_digest} {TOKENIZER_SETTINGS}".encode()).hexdigest()[:16]


def cached_tokenization(
    folders: list[Path], stem: str, input_digest: str, langs: tuple[str, str], make: Callable[[], ParallelText]
) -> ParallelText:
    """The tokenised pairs ``make()`` returns, cached as ``<folder>/<stem>.<key>.<lang>`` (one sentence per line).

    Read from the first of ``folders`` that holds both files; otherwise computed and written (atomically) into
    the first writable folder (none writable: computed every time).
    """
    key = cache_key(input_digest)
    names = [f"{stem}.{key}.{lang}" for lang in langs]
    for folder in folders:
        paths = [folder / name for name in names]
        if all(p.is_file() for p in paths):
            src, tgt = (split_lines(p.read_text(encoding="utf-8")) for p in paths)
            if len(src) == len(tgt):
                return ParallelText(src, tgt)
    text = make()
    for folder in folders:
        if _writable(folder):
            for name, lines in zip(names, (text.sources, text.targets)):
                _atomic_write(folder / name, "".join(f"{line}\n" for line in lines).encode("utf-8"))
            break
    return text
