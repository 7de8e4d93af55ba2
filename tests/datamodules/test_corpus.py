"""Tokenising, the closed deterministic vocabulary, batchify, and clear errors on corrupt text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_revrnn.datamodules import EOS, CorpusFormatError, UnknownTokenError, Vocabulary, batchify, tokenize
from lightning_revrnn.datamodules.corpus import read_tokens, tokenize_bytes


def test_tokenize_appends_eos_per_line_including_empty_lines() -> None:
    assert tokenize(" a b \n \n c\n") == ["a", "b", EOS, EOS, "c", EOS]
    # a last line without a newline still counts; only \n ends a line (\u2028, \x0b are mere whitespace)
    assert tokenize("a\x0bb\u2028c\nd") == ["a", "b", "c", EOS, "d", EOS]


def test_vocabulary_is_sorted_by_frequency_then_token_and_includes_eos() -> None:
    vocab = Vocabulary.build(["b", "a", "c", "a", "b", "z"])
    assert list(vocab) == ["a", "b", "c", "z", EOS]  # by count (eos: 0), ties lexicographic
    assert Vocabulary.build(["z", "c", "b", "b", "a", "a"]) == vocab  # order of appearance is irrelevant
    assert vocab.index("b") == 1 and vocab[1] == "b" and vocab.eos_index == 4 and len(vocab) == 5
    assert "a" in vocab and "q" not in vocab
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.index("q")
    assert torch.equal(vocab.encode(["c", "a", EOS]), torch.tensor([2, 0, 4]))


def test_closed_vocabulary_error_names_source_token_and_line() -> None:
    vocab = Vocabulary.build(["a", "b"])
    with pytest.raises(UnknownTokenError, match=r"valid\.txt: 2 distinct token\(s\).*first 'x' at line 2"):
        vocab.encode(tokenize("a b\nb x\ny\n"), source="valid.txt")


def test_bad_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b" good line \n bad \xff here \n")
    with pytest.raises(CorpusFormatError, match=r"bad\.txt: invalid UTF-8 at byte offset 17 \(line 2"):
        read_tokens(path)


def test_empty_split_names_file(tmp_path: Path) -> None:
    for content in (b"", b" \n \n"):
        path = tmp_path / "empty.txt"
        path.write_bytes(content)
        with pytest.raises(CorpusFormatError, match=r"empty\.txt: the split is empty"):
            read_tokens(path)
    assert tokenize_bytes(b"x\n", "ok") == ["x", EOS]


def test_batchify_cuts_contiguous_streams_and_drops_remainder() -> None:
    ids = torch.arange(11)
    out = batchify(ids, 3)
    assert out.shape == (3, 3)
    assert out[:, 0].tolist() == [0, 1, 2] and out[:, 1].tolist() == [3, 4, 5] and out[:, 2].tolist() == [6, 7, 8]
    with pytest.raises(ValueError, match="1-D"):
        batchify(ids.view(1, -1), 2)
