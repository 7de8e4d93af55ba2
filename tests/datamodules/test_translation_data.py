"""Translation DataModules: vocabularies, batches, bucketing, DDP shares, epochs, files, IWSLT pipeline, synthetic task.

Multi30K and the IWSLT dev/test sets are read from the shared data (``REVRNN_DATA_DIR``, default
``/work/shared/data``; the tests skip when it lacks them). Nothing is written there: the IWSLT tests link the
real XML files into ``tmp_path`` next to a small training archive built here with the WIT3 member layout.
"""

from __future__ import annotations

import io
import os
import tarfile
import urllib.error
import urllib.request
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

import lightning_revrnn.datamodules.iwslt_text as iwslt_text
from lightning_revrnn.datamodules import ChecksumMismatchError, CorpusFormatError, MissingDataError
from lightning_revrnn.datamodules.iwslt import IWSLT2016_SPEC, WIT3_TEXTS, TrainingSource, git_blob_id
from lightning_revrnn.datamodules.translation import (
    BOS,
    EOS,
    PAD,
    SPECIALS,
    UNK,
    IWSLT2016DataModule,
    Multi30KDataModule,
    ParallelText,
    SyntheticTranslationDataModule,
    TranslationBatch,
    TranslationDataModule,
    TranslationVocabulary,
)

SHARED = Path(os.environ.get("REVRNN_DATA_DIR", "/work/shared/data"))
MULTI30K_TOK = SHARED / "multi30k" / "tok"
IWSLT_DIR = SHARED / "iwslt2016-de-en"
IWSLT_XML = sorted(IWSLT2016_SPEC.files.values())


def _need(files: list[Path]) -> None:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"shared data not available: {missing} (set REVRNN_DATA_DIR to the data folder)")


def _fake_trainer(rank: int, world_size: int, epoch: int = 0) -> SimpleNamespace:
    """What the DataModules read from an attached Trainer, to simulate a DDP rank."""
    return SimpleNamespace(global_rank=rank, world_size=world_size, current_epoch=epoch)


def _synthetic(**kwargs: Any) -> SyntheticTranslationDataModule:
    settings: dict[str, Any] = dict(
        vocab=10, min_len=2, max_len=9, train_size=120, val_size=50, test_size=30, batch_size=8, seed=0
    )
    settings.update(kwargs)
    return SyntheticTranslationDataModule(**settings)


def _check_batch(batch: TranslationBatch, dm: TranslationDataModule) -> None:
    """Every invariant of the batch contract, row by row (``dm``: the set-up DataModule that made the batch)."""
    src_vocab, tgt_vocab = dm.src_vocab, dm.tgt_vocab
    assert src_vocab is not None and tgt_vocab is not None
    size = len(batch)
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.long
    assert batch.src_keep.dtype == batch.tgt_keep.dtype == torch.bool
    assert batch.src.shape == batch.src_keep.shape and batch.src.shape[1] == size
    assert batch.tgt_in.shape == batch.tgt_out.shape == batch.tgt_keep.shape and batch.tgt_in.shape[1] == size
    assert len(batch.sources) == len(batch.references) == len(batch.indices) == size
    src_len = batch.src_keep.sum(0)
    tgt_len = batch.tgt_keep.sum(0) - 1  # words; the extra position is EOS
    assert (src_len >= 1).all() and (src_len[:-1] >= src_len[1:]).all()  # longest source first
    assert int(src_len.max()) == batch.src.shape[0] and int(tgt_len.max()) + 1 == batch.tgt_in.shape[0]
    assert torch.equal(batch.src_keep, batch.src != PAD) and torch.equal(batch.tgt_keep, batch.tgt_in != PAD)
    assert (batch.tgt_in[0] == BOS).all()
    for j in range(size):
        s, n = int(src_len[j]), int(tgt_len[j])
        assert batch.src_keep[:s, j].all() and not batch.src_keep[s:, j].any()
        assert batch.tgt_keep[: n + 1, j].all() and not batch.tgt_keep[n + 1 :, j].any()
        assert batch.src[:s, j].tolist() == src_vocab.encode(batch.sources[j].split())
        words = tgt_vocab.encode(batch.references[j].split())
        assert batch.tgt_in[1 : n + 1, j].tolist() == words == batch.tgt_out[:n, j].tolist()
        assert int(batch.tgt_out[n, j]) == EOS and (batch.tgt_out[n + 1 :, j] == PAD).all()
        assert not {BOS, EOS, PAD} & set(batch.src[:s, j].tolist())


# ------------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_order_specials_and_limits() -> None:
    sentences = [["b", "a", "c"], ["a", "c"], ["a", "d", "<unk>"]]
    vocab = TranslationVocabulary.build(sentences)
    assert vocab.tokens == [*SPECIALS, "a", "c", "b", "d"]  # by count, ties alphabetical; "<unk>" not counted
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3) and vocab.tokens[:4] == list(SPECIALS)
    assert TranslationVocabulary.build(reversed(sentences)) == vocab  # input order does not matter
    assert TranslationVocabulary.build(sentences, min_freq=2).tokens == [*SPECIALS, "a", "c"]
    assert TranslationVocabulary.build(sentences, max_size=5).tokens == [*SPECIALS, "a"]  # max_size counts specials
    assert len(TranslationVocabulary.build(sentences, max_size=4)) == 4
    with pytest.raises(ValueError, match="max_size"):
        TranslationVocabulary.build(sentences, max_size=3)
    with pytest.raises(ValueError, match="min_freq"):
        TranslationVocabulary.build(sentences, min_freq=0)
    with pytest.raises(ValueError, match="special tokens"):
        TranslationVocabulary(["a", "<unk>", "<s>", "</s>"])
    with pytest.raises(ValueError, match="unique"):
        TranslationVocabulary([*SPECIALS, "a", "a"])


def test_vocabulary_encode_decode_and_state() -> None:
    vocab = TranslationVocabulary.build([["the", "cat", "sat"], ["the", "dog"]])
    ids = vocab.encode(["the", "dog", "sat", "zebra"])
    assert ids[-1] == UNK and UNK not in ids[:-1]
    assert vocab.decode(ids) == ["the", "dog", "sat", "<unk>"]
    assert vocab.decode([BOS, *ids[:2], EOS, *ids[2:]]) == ["the", "dog"]  # stops at EOS, drops BOS
    assert vocab.decode([*ids[:2], PAD, PAD]) == ["the", "dog"]
    assert vocab.decode(torch.tensor([BOS, ids[0], EOS]).tolist()) == ["the"]
    restored = TranslationVocabulary.from_state_dict(vocab.state_dict())
    assert restored == vocab and restored.tokens == vocab.tokens


# ------------------------------------------------------------------------------------------------ Multi30K
@pytest.fixture(scope="module")
def multi30k() -> Multi30KDataModule:
    """Multi30K on the shared data, built once for the module (read-only use)."""
    _need(
        [
            MULTI30K_TOK / f"{stem}.lc.norm.tok.{lang}"
            for stem in ("train", "val", "test_2016_flickr")
            for lang in ("en", "de")
        ]
    )
    dm = Multi30KDataModule(data_dir=str(SHARED / "multi30k"), download=False)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_multi30k_counts_vocabulary_and_lines(multi30k: Multi30KDataModule) -> None:
    assert [len(multi30k.pairs(s)) for s in ("train", "valid", "test")] == [29_000, 1_014, 1_000]
    assert multi30k.train_pairs_dropped == 0  # no Multi30K sentence is over 50 tokens
    assert (multi30k.src_lang, multi30k.tgt_lang) == ("en", "de")
    lines = (MULTI30K_TOK / "val.lc.norm.tok.de").read_text(encoding="utf-8").split("\n")
    assert multi30k.pairs("valid").text.targets[7] == " ".join(lines[7].split())
    en_words = Counter(
        w
        for line in (MULTI30K_TOK / "train.lc.norm.tok.en").read_text(encoding="utf-8").splitlines()
        for w in line.split()
    )
    assert multi30k.src_vocab_size == len(en_words) + 4  # every training word, plus the specials
    assert multi30k.src_vocab is not None
    counts = [en_words[t] for t in multi30k.src_vocab.tokens[4:]]
    assert counts == sorted(counts, reverse=True)
    rebuilt = TranslationVocabulary.build(s.split() for s in multi30k.pairs("train").text.sources)
    assert rebuilt == multi30k.src_vocab


def test_multi30k_batches_keep_the_contract(multi30k: Multi30KDataModule) -> None:
    train = list(multi30k.train_dataloader())
    assert len(train) == 29_000 // 64 and {len(b) for b in train} == {64}
    for batch in train[:5]:
        _check_batch(batch, multi30k)
    valid = list(multi30k.val_dataloader())
    for batch in valid:
        _check_batch(batch, multi30k)
    texts = multi30k.pairs("valid").text
    seen = [i for b in valid for i in b.indices]
    assert sorted(seen) == list(range(1_014))  # every pair once
    assert all(
        b.references[j] == texts.targets[i] and b.sources[j] == texts.sources[i]
        for b in valid
        for j, i in enumerate(b.indices)
    )
    assert any(bool((b.src == UNK).any()) for b in valid)  # unseen words map to <unk> (open vocabulary)
    predict = list(multi30k.predict_dataloader())
    assert [i for b in predict for i in sorted(b.indices)] == list(range(1_000))  # file order


def test_multi30k_training_batches_are_bucketed(multi30k: Multi30KDataModule) -> None:
    batches = list(multi30k.train_dataloader())
    spread = torch.tensor([float(b.src_lengths.max() - b.src_lengths.min()) for b in batches])
    lengths = multi30k.pairs("train").src_lengths.float()
    gen = torch.Generator().manual_seed(0)
    random_batches = [lengths[torch.randperm(lengths.numel(), generator=gen)[:64]] for _ in range(50)]
    random_spread = torch.tensor([float(b.max() - b.min()) for b in random_batches])
    assert spread.mean() < random_spread.mean() / 5
    assert float((spread <= 2).float().mean()) > 0.9  # only batches at a pool's long tail spread wider


# ------------------------------------------------------------------------------------------------ files and errors
def _tok_copy(folder: Path) -> Path:
    """``folder`` laid out as a Multi30K data_dir: ``tok/`` linking the shared files."""
    _need([MULTI30K_TOK / name for name in Multi30KDataModule.spec.files.values()])
    (folder / "tok").mkdir(parents=True)
    for name in Multi30KDataModule.spec.files.values():
        (folder / "tok" / name).symlink_to(MULTI30K_TOK / name)
    return folder


def test_multi30k_corrupt_and_missing_files(tmp_path: Path) -> None:
    folder = _tok_copy(tmp_path / "multi30k")
    bad = folder / "tok" / "val.lc.norm.tok.de"
    data = bad.read_bytes()
    bad.unlink()
    bad.write_bytes(data.replace(b"ein", b"eine", 1))
    dm = Multi30KDataModule(data_dir=str(folder), download=False)
    with pytest.raises(ChecksumMismatchError, match=r"val\.lc\.norm\.tok\.de.*expected sha256 97232bd2"):
        dm.prepare_data()
    with pytest.raises(ChecksumMismatchError, match=r"val\.lc\.norm\.tok\.de"):
        dm.setup("fit")
    bad.unlink()
    with pytest.raises(MissingDataError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(bad) in message and "download=False" in message and "REVRNN_DATA_DIR" in message
    assert "raw.githubusercontent.com/multi30k/dataset/7bee46bc" in message and "/master/" in message


def test_multi30k_download_tries_mirrors_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _tok_copy(tmp_path / "multi30k")
    missing = folder / "tok" / "test_2016_flickr.lc.norm.tok.en"
    missing.unlink()
    good = (MULTI30K_TOK / missing.name).read_bytes()
    asked: list[str] = []

    def fake_urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        asked.append(url)
        if "/master/" in url:
            return io.BytesIO(good)
        raise urllib.error.URLError("host unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    Multi30KDataModule(data_dir=str(folder)).prepare_data()
    assert [u.split("/")[5] for u in asked] == ["7bee46bc74186b4b6254603143610f730d40bf66", "master"]
    assert missing.read_bytes() == good
    missing.unlink()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"not the file"))
    with pytest.raises(MissingDataError, match=r"checksum mismatch.*test_2016_flickr\.lc\.norm\.tok\.en"):
        Multi30KDataModule(data_dir=str(folder)).prepare_data()
    assert not missing.exists()  # nothing unverified is left behind


# ------------------------------------------------------------------------------------------------ base behaviour
class _Toy(TranslationDataModule):
    """Fixed pairs, for the length filter."""

    def __init__(self, text: dict[str, ParallelText], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text = text

    def read_split(self, split: str) -> ParallelText:
        return self.text[split]


def test_max_len_drops_long_training_pairs_only() -> None:
    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in range(n))

    train = ParallelText([words(3), words(6), words(2), words(5)], [words(2), words(2), words(7), words(5)])
    evaluation = ParallelText([words(9)], [words(9)])
    dm = _Toy({"train": train, "valid": evaluation, "test": evaluation}, batch_size=1, max_len=5)
    dm.setup("fit")
    dm.setup("test")
    assert dm.pairs("train").text.sources == [words(3), words(5)] and dm.train_pairs_dropped == 2
    assert len(dm.pairs("valid")) == len(dm.pairs("test")) == 1  # never filtered
    assert dm.src_vocab is not None and "w5" not in dm.src_vocab and "w4" in dm.src_vocab  # vocab of the kept pairs
    assert dm.pairs("valid").src_ids.tolist().count(UNK) == 4


def test_training_epochs_reshuffle_deterministically() -> None:
    def epoch_batches(dm: SyntheticTranslationDataModule, epoch: int) -> list[list[int]]:
        dataset = dm.train_dataset()
        dataset.set_epoch(epoch)
        return [b.indices for b in dataset]

    dm = _synthetic()
    dm.setup("fit")
    first, second = epoch_batches(dm, 0), epoch_batches(dm, 1)
    assert first != second and sorted(map(sorted, first)) != sorted(map(sorted, second))  # new buckets
    for batches in (first, second):
        flat = [i for b in batches for i in b]
        assert len(batches) == 120 // 8 and len(flat) == len(set(flat)) == 120  # all pairs, once
    again = _synthetic()
    again.setup("fit")
    assert epoch_batches(again, 1) == second and epoch_batches(again, 0) == first
    other = _synthetic(seed=1)
    other.setup("fit")
    assert epoch_batches(other, 0) != first
    loader = dm.train_dataloader()  # no trainer: consecutive passes are epochs 0, 1, ...
    assert [[b.indices for b in loader] for _ in range(2)] == [first, second]
    dm.trainer = _fake_trainer(0, 1, epoch=1)  # type: ignore[assignment]
    assert [b.indices for b in dm.train_dataloader()] == second  # the trainer's epoch wins


def _rank_batches(world_size: int, rank: int, split: str, epoch: int = 0) -> list[TranslationBatch]:
    dm = _synthetic()
    dm.trainer = _fake_trainer(rank, world_size, epoch)  # type: ignore[assignment]
    dm.setup("fit")
    dm.setup("test")
    loader = {"train": dm.train_dataloader, "valid": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return list(loader)


@pytest.mark.parametrize("split", ["train", "valid"])
def test_ddp_ranks_get_distinct_pairs_and_equal_batch_counts(split: str) -> None:
    single = [sorted(b.indices) for b in _rank_batches(1, 0, split, epoch=3)]
    for world_size in (2, 4):
        ranks = [_rank_batches(world_size, r, split, epoch=3) for r in range(world_size)]
        assert {len(r) for r in ranks} == {len(single)}
        for k, batch in enumerate(single):
            shares = [ranks[r][k].indices for r in range(world_size)]
            assert all(shares) and sorted(i for s in shares for i in s) == batch  # disjoint, together the batch
            if split == "train":
                assert {len(s) for s in shares} == {8 // world_size}
    if split == "valid":
        assert sorted(i for b in single for i in b) == list(range(50))
    with pytest.raises(ValueError, match=r"batch_size=8 is the global batch.*world size 3"):
        _rank_batches(3, 0, split)


def test_training_position_resumes_mid_epoch_and_workers_keep_the_order() -> None:
    dm = _synthetic()
    dm.setup("fit")
    loader = dm.train_dataloader()
    full = [b.indices for b in loader]
    iterator = iter(loader)
    next(iterator), next(iterator), next(iterator)
    state = loader.state_dict()
    assert (state["epoch"], state["windows"]) == (1, 3)
    resumed = _synthetic()
    resumed.setup("fit")
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(state)
    second_epoch = _synthetic()
    second_epoch.setup("fit")
    dataset = second_epoch.train_dataset()
    dataset.set_epoch(1)
    expected = [b.indices for b in dataset]
    assert [b.indices for b in resumed_loader] == expected[3:] and expected != full
    parallel = _synthetic()
    parallel.num_workers = 2
    parallel.setup("fit")
    assert [b.indices for b in parallel.train_dataloader()] == full
    assert [b.indices for b in parallel.val_dataloader()] == [b.indices for b in dm.val_dataloader()]


# ------------------------------------------------------------------------------------------------ IWSLT
TRAIN_EN = (
    "<url>http://www.ted.com/talks/a_talk.html</url>\n<keywords>talks, science</keywords>\n"
    "<speaker>A Speaker</speaker>\n<talkid>1</talkid>\n<title>A Talk</title>\n"
    '<description>TED Talk Subtitles and Transcript: about "things"</description>\n'
    "Hello, World! It's Mr. Smith's \"test\".\n"
    "  Second   sentence -- with well-known words.  \n"
    "\n"
    '<reviewer href="x">R</reviewer>\n<translator href="y">T</translator>\n'
    "The end (of it): 3.5% & more.\n"
)
TRAIN_DE = (
    "<url>http://www.ted.com/talks/a_talk.html</url>\n<keywords>vortrag, wissenschaft</keywords>\n"
    "<speaker>A Speaker</speaker>\n<talkid>1</talkid>\n<title>Ein Vortrag</title>\n"
    "<description>TED Talk Untertitel</description>\n"
    'Hallo, Welt! Das ist Herrn Schmidts "Test".\n'
    "Zweiter Satz -- mit bekannten Wörtern.\n"
    "Nur deutsch, keine Übersetzung.\n"
    '<reviewer href="x">R</reviewer>\n<translator href="y">T</translator>\n'
    "Das Ende (davon): 3,5 % & mehr.\n"
)
EXPECTED_EN = [
    "hello , world ! it 's mr. smith 's \" test \" .",
    "second sentence -- with well-known words .",
    "the end ( of it ) : 3.5 % & more .",
]
EXPECTED_DE = [
    'hallo , welt ! das ist herrn schmidts " test " .',
    "zweiter satz -- mit bekannten wörtern .",
    "das ende ( davon ) : 3,5 % & mehr .",
]


def _archive(pair: str, extra: dict[str, bytes] | None = None) -> bytes:
    """A WIT3-layout ``<pair>.tgz`` with the two tagged training files (and ``extra`` members)."""
    members = {
        f"{pair}/train.tags.{pair}.en": TRAIN_EN.encode(),
        f"{pair}/train.tags.{pair}.de": TRAIN_DE.encode(),
        f"{pair}/README": b"readme\n",
        **(extra or {}),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def iwslt_dir(tmp_path: Path) -> Path:
    """``tmp_path/iwslt``: links to the real dev/test XML files, no training text yet."""
    _need([IWSLT_DIR / name for name in IWSLT_XML])
    folder = tmp_path / "iwslt"
    folder.mkdir()
    for name in IWSLT_XML:
        (folder / name).symlink_to(IWSLT_DIR / name)
    return folder


def _iwslt(folder: Path, **kwargs: Any) -> IWSLT2016DataModule:
    return IWSLT2016DataModule(data_dir=str(folder), batch_size=2, **kwargs)


def test_iwslt_pipeline_on_a_local_archive(iwslt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (iwslt_dir / "en-de.tgz").write_bytes(_archive("en-de"))
    dm = _iwslt(iwslt_dir, download=False)
    with pytest.warns(UserWarning, match="no published checksum"):  # once, when prepare_data reads the archive
        dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    train = dm.pairs("train").text
    assert train.sources == EXPECTED_EN and train.targets == EXPECTED_DE  # tags, blank and unpaired lines gone
    assert [len(dm.pairs("valid")), len(dm.pairs("test"))] == [993, 1_305]  # tst2013, tst2014
    valid = dm.pairs("valid").text
    assert valid.sources[0] == ("when i was 11 , i remember waking up one morning to the sound of joy in my house .")
    assert valid.targets[0].startswith("als ich 11 jahre alt war ,")
    h_and_m = [s for s in valid.sources if "american vogue" in s]
    assert len(h_and_m) == 1 and "ceo of h & m ," in h_and_m[0]  # "H&amp;M": entity decoded, "&" not escaped
    assert all(s == s.lower() for s in valid.sources + valid.targets)
    for batch in dm.train_dataloader():
        _check_batch(batch, dm)
    cached = sorted(p.name.split(".")[0] for p in (iwslt_dir / "tokenized").iterdir())
    assert cached == ["test", "test", "train", "train", "valid", "valid"]

    def no_tokenizing(*args: Any) -> list[str]:
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(iwslt_text, "moses_tokenize", no_tokenizing)
    again = _iwslt(iwslt_dir, download=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.setup("fit")
    assert again.pairs("train").text == train and again.src_vocab == dm.src_vocab


def test_iwslt_missing_training_text_names_files_urls_and_folder(
    iwslt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MissingDataError) as err:
        _iwslt(iwslt_dir, download=False).prepare_data()
    message = str(err.value)
    for part in (
        "de-en.tgz",
        "en-de.tgz",
        "train.tags.de-en.en",
        f"{WIT3_TEXTS}/de/en/de-en.tgz",
        f"{WIT3_TEXTS}/en/de/en-de.tgz",
        str(iwslt_dir),
        "REVRNN_DATA_DIR",
        "dc7bd534272f5b225ae1",
    ):
        assert part in message
    with pytest.raises(MissingDataError, match="setup"):
        _iwslt(iwslt_dir).setup("fit")

    def offline(url: str, timeout: float | None = None) -> io.BytesIO:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MissingDataError, match=r"Every download failed:\s+1\. https://wit3.*de-en\.tgz: URLError"):
        _iwslt(iwslt_dir).prepare_data()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"<html>moved</html>"))
    with pytest.raises(MissingDataError) as err:
        _iwslt(iwslt_dir).prepare_data()
    assert "de-en.tgz: checksum mismatch: git blob id" in str(err.value)
    assert "en-de.tgz: " in str(err.value) and "not a readable .tgz archive" in str(err.value)
    assert sorted(p.name for p in iwslt_dir.iterdir()) == IWSLT_XML  # no partial or rejected download left


def test_iwslt_downloads_the_next_archive_when_one_fails(iwslt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _archive("en-de")

    def fake_urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        if url.endswith("/de-en.tgz"):
            return io.BytesIO(b"<html>moved</html>")  # fails the git blob check, is not kept
        return io.BytesIO(archive)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    dm = _iwslt(iwslt_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare_data()
        dm.setup("fit")
    assert (iwslt_dir / "en-de.tgz").read_bytes() == archive and not (iwslt_dir / "de-en.tgz").exists()
    assert dm.pairs("train").text.sources == EXPECTED_EN


def test_iwslt_checksums_of_training_text(iwslt_dir: Path) -> None:
    (iwslt_dir / "de-en.tgz").write_bytes(_archive("de-en"))
    with pytest.raises(ChecksumMismatchError, match=r"de-en\.tgz: git blob id [0-9a-f]{40}, expected dc7bd534"):
        _iwslt(iwslt_dir, download=False).prepare_data()
    (iwslt_dir / "de-en.tgz").unlink()
    (iwslt_dir / "train.tags.de-en.en").write_text(TRAIN_EN, encoding="utf-8")
    (iwslt_dir / "train.tags.de-en.de").write_text(TRAIN_DE, encoding="utf-8")
    mismatch = r"train\.tags\.de-en\.en: git blob id [0-9a-f]{40}, expected e1ae5f9e"
    with pytest.raises(ChecksumMismatchError, match=mismatch):
        _iwslt(iwslt_dir, download=False).setup("fit")
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of "hello\n"


def test_iwslt_dev_test_files_come_from_a_local_archive(iwslt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xml = {f"de-en/{name}": (IWSLT_DIR / name).read_bytes() for name in IWSLT_XML}
    (iwslt_dir / "de-en.tgz").write_bytes(_archive("de-en", xml))
    for name in IWSLT_XML:
        (iwslt_dir / name).unlink()
    dm = _iwslt(iwslt_dir, download=False)
    unverified = [TrainingSource(s.files, s.pair, {}, s.url) for s in dm.training_sources]
    monkeypatch.setattr(dm, "training_sources", unverified)  # the small archive has no published blob id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.prepare_data()
        dm.setup("test")
    assert all((iwslt_dir / name).read_bytes() == xml[f"de-en/{name}"] for name in IWSLT_XML)
    assert len(dm.pairs("test")) == 1_305 and dm.pairs("train").text.targets == EXPECTED_DE


@pytest.mark.filterwarnings("ignore:.* has no published checksum:UserWarning")
def test_iwslt_unaligned_files_are_refused(iwslt_dir: Path) -> None:
    (iwslt_dir / "en-de.tgz").write_bytes(_archive("en-de", {"en-de/train.tags.en-de.de": b"nur eine zeile\n"}))
    with pytest.raises(CorpusFormatError, match=r"train\.tags\.en-de\.en has 12 lines but .*de has 1"):
        _iwslt(iwslt_dir, download=False).setup("fit")


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_task_rule_and_determinism() -> None:
    dm = _synthetic()
    dm.setup("fit")
    dm.setup("test")
    texts = {s: dm.pairs(s).text for s in ("train", "valid", "test")}
    assert [len(t) for t in texts.values()] == [120, 50, 30]
    assert len(set(dm.mapping.values())) == len(dm.mapping) == 10  # a bijection
    for text in texts.values():
        for src, tgt in zip(text.sources, text.targets):
            words = src.split()
            assert 2 <= len(words) <= 9 and tgt.split() == [dm.mapping[w] for w in reversed(words)]
    train = set(texts["train"].sources)
    assert not train & set(texts["valid"].sources) and not train & set(texts["test"].sources)
    assert not set(texts["valid"].sources) & set(texts["test"].sources)
    same = _synthetic()
    same.setup("fit")
    same.setup("test")
    assert all(same.pairs(s).text == texts[s] for s in texts) and same.tgt_vocab == dm.tgt_vocab
    other = _synthetic(seed=1)
    other.setup("fit")
    assert other.pairs("train").text != texts["train"] and other.mapping != dm.mapping
    for batch in dm.val_dataloader():
        _check_batch(batch, dm)
    with pytest.raises(ValueError, match="distinct sentences"):
        _synthetic(vocab=2, min_len=1, max_len=2, train_size=10, val_size=5, test_size=5).setup("test")


class _Recorder(pl.LightningModule):
    """Takes TranslationBatches through a Trainer; records what each stage saw."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.out = torch.nn.Linear(4, vocab)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: TranslationBatch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, TranslationBatch)
        self.seen.append((self.current_epoch, batch.indices))
        logits = self.out(self.emb(batch.tgt_in))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD)

    def predict_step(self, batch: TranslationBatch, batch_idx: int) -> list[int]:
        return batch.indices

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_with_a_trainer_epochs_differ_and_predict_keeps_file_order(tmp_path: Path) -> None:
    dm = _synthetic()
    dm.setup("fit")
    model = _Recorder(dm.tgt_vocab_size)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
        predicted = trainer.predict(model, dm)
    epochs = [[idx for e, idx in model.seen if e == epoch] for epoch in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == 15 and epochs[0] != epochs[1]
    reference = _synthetic()
    reference.setup("fit")
    dataset = reference.train_dataset()
    dataset.set_epoch(1)
    assert epochs[1] == [b.indices for b in dataset]
    assert predicted is not None
    assert [i for b in predicted for i in sorted(b)] == list(range(30))
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert dm.tgt_vocab is not None
    assert checkpoint["SyntheticTranslationDataModule"]["tgt_vocab"]["tokens"] == dm.tgt_vocab.tokens
    position = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (position["epoch"], position["windows"], position["finished"]) == (1, 15, True)
    other = _synthetic(seed=1)
    other.setup("fit")
    with pytest.raises(ValueError, match="checkpoint's src_vocab"):
        other.load_state_dict(checkpoint["SyntheticTranslationDataModule"])
    fresh = _synthetic()
    fresh.load_state_dict(checkpoint["SyntheticTranslationDataModule"])
    assert fresh.tgt_vocab == dm.tgt_vocab
