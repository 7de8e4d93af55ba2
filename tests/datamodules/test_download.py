"""Checksums, clear missing-data errors, and atomic downloads (served from local archives, no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
from dm_helpers import shared_corpus_dir, small_text

from lightning_revrnn.datamodules import (
    PTB_SPEC,
    WIKITEXT2_SPEC,
    ChecksumMismatchError,
    CorpusSpec,
    MissingDataError,
    PTBDataModule,
    WikiText2DataModule,
)

TEXTS = {"train": small_text(60, 1), "valid": small_text(20, 2), "test": small_text(20, 3)}


def _spec_for(spec: CorpusSpec, texts: dict[str, bytes] = TEXTS) -> CorpusSpec:
    hashes = {spec.files[s]: hashlib.sha256(data).hexdigest() for s, data in texts.items()}
    return dataclasses.replace(spec, sha256=hashes)


def _tgz(texts: dict[str, bytes] = TEXTS) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        members = {"./simple-examples/data/README": b"other member\n"}
        members.update({PTB_SPEC.members[PTB_SPEC.files[s]]: data for s, data in texts.items()})
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(texts: dict[str, bytes] = TEXTS) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("wikitext-2/", b"")
        for s, data in texts.items():
            zf.writestr(WIKITEXT2_SPEC.members[WIKITEXT2_SPEC.files[s]], data)
    return buf.getvalue()


class _Response(io.BytesIO):
    """A response that fails with a connection reset after ``fail_at`` bytes (if given)."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        if self.fail_at is not None:
            if self.tell() >= self.fail_at:
                raise ConnectionResetError("connection reset by peer")
            n = self.fail_at - self.tell() if n is None or n < 0 else min(n, self.fail_at - self.tell())
        return super().read(n)


def _serve(monkeypatch: pytest.MonkeyPatch, data: bytes | Exception, fail_at: int | None = None) -> list[str]:
    requested: list[str] = []

    def fake_urlopen(url: str, *args: Any, **kwargs: Any) -> _Response:
        requested.append(url)
        if isinstance(data, Exception):
            raise data
        return _Response(data, fail_at)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return requested


def test_download_tgz_extracts_verified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    requested = _serve(monkeypatch, _tgz())
    dm = PTBDataModule(tmp_path / "ptb", batch_size=2, eval_batch_size=2, bptt=5)
    dm.prepare_data()
    assert requested == [PTB_SPEC.url]
    assert sorted(p.name for p in (tmp_path / "ptb").iterdir()) == sorted(PTB_SPEC.files.values())  # no leftovers
    for split, data in TEXTS.items():
        assert dm.path(split).read_bytes() == data
    dm.setup()
    assert dm.vocab is not None and "cat" in dm.vocab
    dm.prepare_data()  # already complete and verified: no second download
    assert requested == [PTB_SPEC.url]


def test_download_zip_extracts_verified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WikiText2DataModule, "spec", _spec_for(WIKITEXT2_SPEC))
    requested = _serve(monkeypatch, _zip())
    dm = WikiText2DataModule(tmp_path / "wikitext-2")
    dm.prepare_data()
    assert requested == [WIKITEXT2_SPEC.url]
    assert sorted(p.name for p in dm.data_dir.iterdir()) == sorted(WIKITEXT2_SPEC.files.values())
    assert dm.path("valid").read_bytes() == TEXTS["valid"]


def test_only_missing_files_are_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    folder = tmp_path / "ptb"
    folder.mkdir()
    present = folder / "ptb.valid.txt"
    present.write_bytes(TEXTS["valid"])
    before = present.stat()
    _serve(monkeypatch, _tgz())
    PTBDataModule(folder).prepare_data()
    after = present.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (folder / "ptb.train.txt").read_bytes() == TEXTS["train"]


def test_interrupted_download_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    archive = _tgz()
    _serve(monkeypatch, archive, fail_at=len(archive) // 2)
    folder = tmp_path / "ptb"
    with pytest.raises(MissingDataError) as info:
        PTBDataModule(folder).prepare_data()
    message = str(info.value)
    assert "connection reset" in message and PTB_SPEC.url in message and "REVRNN_DATA_DIR" in message
    assert list(folder.iterdir()) == []  # neither a final file nor a temporary one


def test_truncated_archive_and_corrupt_member_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    folder = tmp_path / "ptb"
    archive = _tgz()
    _serve(monkeypatch, archive[: len(archive) // 2])  # the server closed early without an error
    with pytest.raises(MissingDataError, match="Downloading .* failed"):
        PTBDataModule(folder).prepare_data()
    assert list(folder.iterdir()) == []

    _serve(monkeypatch, _tgz({**TEXTS, "train": TEXTS["train"] + b" tampered \n"}))
    with pytest.raises(ChecksumMismatchError, match=r"ptb\.train\.txt.*was not written"):
        PTBDataModule(folder).prepare_data()
    assert list(folder.iterdir()) == []

    _serve(monkeypatch, _tgz({"train": TEXTS["train"]}))
    with pytest.raises(MissingDataError, match=r"has no member .*ptb\.test\.txt"):
        PTBDataModule(folder).prepare_data()
    assert list(folder.iterdir()) == []


def test_missing_files_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVRNN_DATA_DIR", raising=False)
    requested = _serve(monkeypatch, urllib.error.URLError("[Errno -3] Temporary failure in name resolution"))
    folder = tmp_path / "ptb"
    for download in (False, True):
        with pytest.raises(MissingDataError) as info:
            PTBDataModule(folder, download=download).prepare_data()
        message = str(info.value)
        for name in PTB_SPEC.files.values():
            assert name in message
        assert PTB_SPEC.url in message and "REVRNN_DATA_DIR" in message
        assert ("download=False" in message) == (not download)
    assert requested == [PTB_SPEC.url]  # download=False never touches the network
    assert isinstance(info.value, FileNotFoundError)
    # a stale partial file from a killed download never passes as complete
    (folder / ".ptb.train.txt.abc.part").write_bytes(TEXTS["train"][:10])
    with pytest.raises(MissingDataError, match=r"ptb\.train\.txt"):
        PTBDataModule(folder, download=False).prepare_data()
    # setup() without prepare_data() names what is missing too
    with pytest.raises(MissingDataError, match=r"ptb\.train\.txt.*prepare_data"):
        PTBDataModule(folder, download=False).setup()


def test_checksum_mismatch_names_file_hashes_and_fix(tmp_path: Path) -> None:
    source = shared_corpus_dir("ptb", list(PTB_SPEC.files.values()))
    folder = tmp_path / "ptb"
    shutil.copytree(source, folder)
    train = folder / "ptb.train.txt"
    data = bytearray(train.read_bytes())
    data[100:103] = b"xyz"
    train.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    dm = PTBDataModule(folder)
    with pytest.raises(ChecksumMismatchError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(train) in message and PTB_SPEC.sha256["ptb.train.txt"] in message and actual in message
    assert "Delete it" in message and "re-download" in message
    with pytest.raises(ChecksumMismatchError):  # setup() re-verifies what it reads
        dm.setup()
