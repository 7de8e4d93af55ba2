"""PTB and WikiText-2: published sizes, the batch contract, data folders, and errors on corrupt splits."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import torch
from dm_helpers import shared_corpus_dir, small_text, write_corpus

from lightning_revrnn.datamodules import (
    EOS,
    PTB_SPEC,
    WIKITEXT2_SPEC,
    CorpusFormatError,
    PTBDataModule,
    UnknownTokenError,
    WikiText2DataModule,
)


@pytest.fixture(scope="module")
def ptb() -> PTBDataModule:
    dm = PTBDataModule(shared_corpus_dir("ptb", list(PTB_SPEC.files.values())), download=False)
    dm.prepare_data()  # verifies the checksums
    dm.setup()
    return dm


def test_ptb_sizes_and_vocab(ptb: PTBDataModule) -> None:
    assert ptb.vocab_size == 10_000 and ptb.vocab is not None
    assert [ptb.token_ids(s).numel() for s in ("train", "valid", "test")] == [929_589, 73_760, 82_430]
    assert ptb.eos_index is not None and ptb.vocab[ptb.eos_index] == EOS == ptb.vocab[ptb.vocab.index(EOS)]
    assert "<unk>" in ptb.vocab
    assert int(ptb.token_ids("train").max()) < ptb.vocab_size


def test_wikitext2_sizes_and_vocab() -> None:
    dm = WikiText2DataModule(shared_corpus_dir("wikitext-2", list(WIKITEXT2_SPEC.files.values())), download=False)
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size == 33_278
    assert [dm.token_ids(s).numel() for s in ("train", "valid", "test")] == [2_088_628, 217_646, 245_569]


def test_ptb_batch_contract(ptb: PTBDataModule) -> None:
    loader = ptb.train_dataloader()
    assert isinstance(loader.dataset, torch.utils.data.IterableDataset) and loader.batch_size is None
    windows = list(loader)
    streams = ptb.streams("train")
    assert streams.shape == (929_589 // 20, 20)
    assert len(windows) == len(loader) == -(-(streams.shape[0] - 1) // 70)
    assert windows[0]["reset"] and not any(w["reset"] for w in windows[1:])
    for w in windows:
        assert set(w) == {"inputs", "targets", "reset"}
        assert w["inputs"].shape == w["targets"].shape and w["inputs"].shape[1] == 20
        assert w["inputs"].dtype == torch.long and torch.equal(w["targets"][:-1], w["inputs"][1:])
    assert all(w["inputs"].shape[0] == 70 for w in windows[:-1])
    for prev, nxt in itertools.pairwise(windows):
        assert torch.equal(prev["targets"][-1], nxt["inputs"][0])
    # stream j is the j-th contiguous chunk of the corpus
    ids = ptb.token_ids("train")
    length = streams.shape[0]
    assert torch.equal(windows[0]["inputs"][:, 3], ids[3 * length : 3 * length + 70])
    val = list(ptb.val_dataloader())
    assert val[0]["inputs"].shape == (70, 10) and val[0]["reset"]
    test = list(ptb.test_dataloader())
    assert sum(w["inputs"].shape[0] for w in test) == 82_430 // 10 - 1


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REVRNN_DATA_DIR", str(tmp_path / "data"))
    assert PTBDataModule().data_dir == tmp_path / "data" / "ptb"
    assert WikiText2DataModule().data_dir == tmp_path / "data" / "wikitext-2"
    monkeypatch.delenv("REVRNN_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert PTBDataModule().data_dir == tmp_path / "xdg" / "lightning-revrnn" / "ptb"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert PTBDataModule().data_dir == tmp_path / "home" / ".cache" / "lightning-revrnn" / "ptb"
    assert PTBDataModule(tmp_path / "mine").data_dir == tmp_path / "mine"


def test_vocab_is_deterministic_and_from_train_only(small_corpus: Path) -> None:
    a = PTBDataModule(small_corpus)
    b = PTBDataModule(small_corpus)
    a.setup("fit")
    b.setup("test")  # a different stage still builds the vocabulary from train
    assert a.vocab == b.vocab and a.vocab_size == b.vocab_size
    with pytest.raises(RuntimeError, match="setup"):
        _ = PTBDataModule(small_corpus).vocab_size


def _corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **texts: bytes) -> PTBDataModule:
    base = {"train": small_text(40, 1), "valid": small_text(10, 2), "test": small_text(10, 3)}
    spec = write_corpus(tmp_path / "ptb", {**base, **texts})
    monkeypatch.setattr(PTBDataModule, "spec", spec)
    dm = PTBDataModule(tmp_path / "ptb", batch_size=2, eval_batch_size=2)
    dm.prepare_data()  # hashes match the (deliberately corrupt) files: only decoding can catch them
    return dm


def test_bad_utf8_split_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _corrupt(tmp_path, monkeypatch, train=b" a b \n c \xc3\x28 d \n")
    with pytest.raises(CorpusFormatError, match=r"ptb\.train\.txt: invalid UTF-8 at byte offset 9 \(line 2"):
        dm.setup()


def test_empty_split_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _corrupt(tmp_path, monkeypatch, valid=b"")
    with pytest.raises(CorpusFormatError, match=r"ptb\.valid\.txt: the split is empty"):
        dm.setup("fit")


def test_closed_vocab_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _corrupt(tmp_path, monkeypatch, test=b" the cat \n the zebra sat \n")
    dm.setup("fit")  # train/valid are fine
    with pytest.raises(UnknownTokenError, match=r"ptb\.test\.txt: 1 distinct token.*'zebra' at line 2"):
        dm.setup("test")


def test_hparams_saved(small_corpus: Path) -> None:
    dm = PTBDataModule(small_corpus, batch_size=4, bptt=35, variable_bptt=True, seed=3)
    assert dm.hparams["batch_size"] == 4 and dm.hparams["variable_bptt"] and dm.hparams["seed"] == 3
    assert hashlib.sha256(dm.path("train").read_bytes()).hexdigest() == PTBDataModule.spec.sha256["ptb.train.txt"]
