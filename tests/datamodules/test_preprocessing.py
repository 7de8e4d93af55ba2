"""Each translation DataModule declares how its raw text became tokens (:class:`TextPreprocessing`), and that
declaration reproduces the corpus: Multi30K's official tokenised files, the IWSLT DataModule's own tokeniser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_revrnn.datamodules import (
    IWSLT2016DataModule,
    Multi30KDataModule,
    SyntheticTranslationDataModule,
    TextPreprocessing,
)
from lightning_revrnn.datamodules.iwslt_text import moses_tokenize

DATA_DIR = Path(os.environ.get("REVRNN_DATA_DIR", "/work/shared/data"))
MULTI30K_TOK = DATA_DIR / "multi30k" / "tok"


def test_each_datamodule_declares_its_preprocessing() -> None:
    assert SyntheticTranslationDataModule().preprocessing == TextPreprocessing(
        "whitespace", src_lang="en", tgt_lang="de"
    )
    multi30k = Multi30KDataModule(download=False).preprocessing
    assert (multi30k.tokenizer, multi30k.lowercase, multi30k.normalize_punctuation, multi30k.escape) == (
        "moses",
        "before",
        True,
        True,
    )
    assert IWSLT2016DataModule().preprocessing == TextPreprocessing("moses", lowercase="after")


def test_state_dict_round_trip() -> None:
    prep = Multi30KDataModule(download=False).preprocessing
    assert TextPreprocessing.from_state_dict(prep.state_dict()) == prep
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        TextPreprocessing("spacy")


@pytest.mark.skipif(not MULTI30K_TOK.is_dir(), reason="Multi30K not under REVRNN_DATA_DIR")
@pytest.mark.parametrize(("lang", "side"), [("en", "src"), ("de", "tgt")])
def test_multi30k_lines_come_back_from_their_detokenised_text(lang: str, side: str) -> None:
    """A line of the official ``val.lc.norm.tok`` files, detokenised (what a user would type, less the capitals)
    and prepared again, is the line itself: the declared steps are the ones that made the files."""
    prep = Multi30KDataModule(download=False).preprocessing
    lines = (MULTI30K_TOK / f"val.lc.norm.tok.{lang}").read_text(encoding="utf-8").splitlines()
    for line in lines[:300]:
        assert prep.tokenize(prep.detokenize(line.split(), side), side) == line.split()


def test_multi30k_prepares_raw_text_as_the_files_hold_it() -> None:
    prep = Multi30KDataModule(download=False).preprocessing
    assert " ".join(prep.tokenize("A little boy playing GameCube at a McDonald's.")) == (
        "a little boy playing gamecube at a mcdonald &apos;s ."
    )
    assert " ".join(prep.tokenize("Two men say “hello” loudly.")) == "two men say &quot; hello &quot; loudly ."
    assert prep.detokenize(["ein", "mann", "sagt", ":", "&quot;", "hallo", "&quot;", "."]) == 'ein mann sagt: "hallo".'


def test_iwslt_preprocessing_is_the_datamodules_tokeniser() -> None:
    prep = IWSLT2016DataModule().preprocessing
    sentences = ['Hello, World! It\'s a "test" & more -- well-known.', "Das ist's: 3,5 Mio. Euro (ca.)"]
    for sentence, lang, side in zip(sentences, ("en", "de"), ("src", "tgt")):
        assert " ".join(prep.tokenize(sentence, side)) == moses_tokenize([sentence], lang)[0]
