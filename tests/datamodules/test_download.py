"""Checksums, clear missing-data errors, atomic downloads and mirror fallback (local archives, no network)."""

from __future__ import annotations

import dataclasses
import email.message
import hashlib
import io
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, cast

import pytest
from dm_helpers import shared_corpus_dir, small_text

from lightning_revrnn.datamodules import (
    PTB_SPEC,
    WIKITEXT2_SPEC,
    ArchiveMirror,
    ChecksumMismatchError,
    CorpusSpec,
    FileMirror,
    MissingDataError,
    PTBDataModule,
    WikiText2DataModule,
    ensure_files,
)

TEXTS = {"train": small_text(60, 1), "valid": small_text(20, 2), "test": small_text(20, 3)}


def _spec_for(spec: CorpusSpec, texts: dict[str, bytes] = TEXTS) -> CorpusSpec:
    hashes = {spec.files[s]: hashlib.sha256(data).hexdigest() for s, data in texts.items()}
    return dataclasses.replace(spec, sha256=hashes)


PTB_ARCHIVE = PTB_SPEC.mirror_urls()[0]  # the canonical tgz
PTB_GITHUB = dict(zip(sorted(PTB_SPEC.files.values()), PTB_SPEC.mirror_urls()[1:]))
WT2_REHOST, *WT2_EXAMPLE_FILES, WT2_S3 = WIKITEXT2_SPEC.mirror_urls()  # zip, 3 plain files (test/train/valid), zip


def _tgz(texts: dict[str, bytes] = TEXTS) -> bytes:
    buf = io.BytesIO()
    members = cast(ArchiveMirror, PTB_SPEC.mirrors[0]).members
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        entries = {"./simple-examples/data/README": b"other member\n"}
        entries.update({members[PTB_SPEC.files[s]]: data for s, data in texts.items()})
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(texts: dict[str, bytes] = TEXTS) -> bytes:
    buf = io.BytesIO()
    members = cast(ArchiveMirror, WIKITEXT2_SPEC.mirrors[0]).members
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("wikitext-2/", b"")
        for s, data in texts.items():
            zf.writestr(members[WIKITEXT2_SPEC.files[s]], data)
    return buf.getvalue()


class _Response(io.BytesIO):
    """A response that fails with a connection reset after ``fail_at`` bytes (if given)."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, n: int | None = -1) -> bytes:
        if self.fail_at is not None:
            if self.tell() >= self.fail_at:
                raise ConnectionResetError("connection reset by peer")
            n = self.fail_at - self.tell() if n is None or n < 0 else min(n, self.fail_at - self.tell())
        return super().read(n)


Route = bytes | Exception | tuple[bytes, int]
UNREACHABLE = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def _forbidden(url: str) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(url, 403, "Forbidden", email.message.Message(), None)


def _serve(monkeypatch: pytest.MonkeyPatch, routes: dict[str, Route]) -> list[str]:
    """Answer ``urlopen`` from ``routes`` (URL -> body, exception, or (body, bytes before a reset)); any other
    URL is unreachable. Returns the URLs requested, in order."""
    requested: list[str] = []

    def fake_urlopen(url: str, *args: Any, **kwargs: Any) -> _Response:
        requested.append(url)
        route = routes.get(url, UNREACHABLE)
        if isinstance(route, Exception):
            raise route
        data, fail_at = route if isinstance(route, tuple) else (route, None)
        return _Response(data, fail_at)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return requested


def test_download_tgz_extracts_verified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    requested = _serve(monkeypatch, {PTB_ARCHIVE: _tgz()})
    dm = PTBDataModule(tmp_path / "ptb", batch_size=2, eval_batch_size=2, bptt=5)
    dm.prepare_data()
    assert requested == [PTB_ARCHIVE]
    assert sorted(p.name for p in (tmp_path / "ptb").iterdir()) == sorted(PTB_SPEC.files.values())  # no leftovers
    for split, data in TEXTS.items():
        assert dm.path(split).read_bytes() == data
    dm.setup()
    assert dm.vocab is not None and "cat" in dm.vocab
    dm.prepare_data()  # already complete and verified: no second download
    assert requested == [PTB_ARCHIVE]


def test_download_zip_extracts_verified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WikiText2DataModule, "spec", _spec_for(WIKITEXT2_SPEC))
    requested = _serve(monkeypatch, {WT2_REHOST: _zip()})
    dm = WikiText2DataModule(tmp_path / "wikitext-2")
    dm.prepare_data()
    assert requested == [WT2_REHOST]  # the re-host comes first; the dead S3 URL is never tried
    assert sorted(p.name for p in dm.data_dir.iterdir()) == sorted(WIKITEXT2_SPEC.files.values())
    assert dm.path("valid").read_bytes() == TEXTS["valid"]


def test_only_missing_files_are_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    folder = tmp_path / "ptb"
    folder.mkdir()
    present = folder / "ptb.valid.txt"
    present.write_bytes(TEXTS["valid"])
    before = present.stat()
    _serve(monkeypatch, {PTB_ARCHIVE: _tgz()})
    PTBDataModule(folder).prepare_data()
    after = present.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (folder / "ptb.train.txt").read_bytes() == TEXTS["train"]


def test_wikitext2_falls_back_past_403_and_corrupt_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-host 403, the PyTorch example's copy of train corrupt (valid/test fine), then the original zip."""
    monkeypatch.setattr(WikiText2DataModule, "spec", _spec_for(WIKITEXT2_SPEC))
    examples = dict(zip(("test", "train", "valid"), WT2_EXAMPLE_FILES, strict=True))
    routes: dict[str, Route] = {WT2_REHOST: _forbidden(WT2_REHOST), WT2_S3: _zip()}
    routes.update({url: TEXTS[split] for split, url in examples.items()})
    routes[examples["train"]] = TEXTS["train"].replace(b"cat", b"bat", 1)
    requested = _serve(monkeypatch, routes)
    dm = WikiText2DataModule(tmp_path / "wikitext-2")
    dm.prepare_data()
    assert requested == [WT2_REHOST, *WT2_EXAMPLE_FILES, WT2_S3]
    for split, data in TEXTS.items():
        assert dm.path(split).read_bytes() == data
    assert sorted(p.name for p in dm.data_dir.iterdir()) == sorted(WIKITEXT2_SPEC.files.values())


def test_all_mirrors_failing_lists_every_url_and_where_to_put_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(WikiText2DataModule, "spec", _spec_for(WIKITEXT2_SPEC))
    monkeypatch.setenv("REVRNN_DATA_DIR", str(tmp_path))
    examples = dict(zip(("test", "train", "valid"), WT2_EXAMPLE_FILES, strict=True))
    routes: dict[str, Route] = {WT2_REHOST: _forbidden(WT2_REHOST), WT2_S3: _zip()[:200]}  # 403; truncated zip
    routes[examples["train"]] = b" tampered \n"
    requested = _serve(monkeypatch, routes)  # valid.txt/test.txt unreachable
    dm = WikiText2DataModule()
    with pytest.raises(MissingDataError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert requested == [WT2_REHOST, *WT2_EXAMPLE_FILES, WT2_S3]
    lines = [line.strip() for line in message.splitlines()]
    assert any(line.startswith(f"1. {WT2_REHOST}: HTTPError") and "403" in line for line in lines), message
    assert any(line.startswith(f"2. {examples['test']}: URLError") for line in lines), message
    assert any(line.startswith(f"3. {examples['train']}: checksum mismatch") for line in lines), message
    assert any(line.startswith(f"4. {examples['valid']}: URLError") for line in lines), message
    assert any(line.startswith(f"5. {WT2_S3}: unreadable zip archive") for line in lines), message
    assert str(tmp_path / "wikitext-2") in message and "REVRNN_DATA_DIR" in message
    for name, digest in _spec_for(WIKITEXT2_SPEC).sha256.items():
        assert name in message and digest in message  # what to put there, and how to check it
    assert list(dm.data_dir.iterdir()) == []  # nothing partial or corrupt left behind


def test_fallback_with_local_file_urls(tmp_path: Path) -> None:
    """Real ``urlopen`` on ``file://`` URLs: a missing archive, a corrupt one, then good plain files."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "corrupt.zip").write_bytes(_zip({**TEXTS, "valid": TEXTS["valid"] + b" extra \n"}))
    for split, data in TEXTS.items():
        (served / f"{split}.txt").write_bytes(data)
    members = cast(ArchiveMirror, WIKITEXT2_SPEC.mirrors[0]).members
    spec = dataclasses.replace(
        _spec_for(WIKITEXT2_SPEC),
        mirrors=(
            ArchiveMirror((served / "absent.zip").as_uri(), "zip", members),
            ArchiveMirror((served / "corrupt.zip").as_uri(), "zip", members),
            FileMirror({f"wiki.{s}.tokens": (served / f"{s}.txt").as_uri() for s in TEXTS}),
        ),
    )
    folder = tmp_path / "wikitext-2"
    ensure_files(spec, folder)
    for split, data in TEXTS.items():
        assert (folder / spec.files[split]).read_bytes() == data
    assert sorted(p.name for p in folder.iterdir()) == sorted(spec.files.values())
    # train and test came from the corrupt archive's good members already; only valid from the plain files
    (served / "valid.txt").unlink()
    (folder / "wiki.valid.tokens").unlink()
    with pytest.raises(MissingDataError) as info:
        ensure_files(spec, folder)
    message = str(info.value)
    for url in (served / "absent.zip").as_uri(), (served / "corrupt.zip").as_uri(), (served / "valid.txt").as_uri():
        assert url in message
    assert "checksum mismatch for wikitext-2/wiki.valid.tokens" in message


def test_interrupted_download_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    archive = _tgz()
    _serve(monkeypatch, {PTB_ARCHIVE: (archive, len(archive) // 2)})  # the GitHub copies are unreachable
    folder = tmp_path / "ptb"
    with pytest.raises(MissingDataError) as info:
        PTBDataModule(folder).prepare_data()
    message = str(info.value)
    assert "connection reset" in message and "REVRNN_DATA_DIR" in message
    assert all(url in message for url in PTB_SPEC.mirror_urls())
    assert list(folder.iterdir()) == []  # neither a final file nor a temporary one


def test_truncated_archive_and_corrupt_member_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    folder = tmp_path / "ptb"
    archive = _tgz()
    _serve(monkeypatch, {PTB_ARCHIVE: archive[: len(archive) // 2]})  # the server closed early without an error
    with pytest.raises(MissingDataError, match="unreadable tgz archive"):
        PTBDataModule(folder).prepare_data()
    assert list(folder.iterdir()) == []

    _serve(monkeypatch, {PTB_ARCHIVE: _tgz({**TEXTS, "train": TEXTS["train"] + b" tampered \n"})})
    with pytest.raises(MissingDataError, match=r"checksum mismatch for \./simple-examples/data/ptb\.train\.txt"):
        PTBDataModule(folder).prepare_data()
    assert sorted(p.name for p in folder.iterdir()) == ["ptb.test.txt", "ptb.valid.txt"]  # verified ones only
    for path in folder.iterdir():
        path.unlink()

    _serve(monkeypatch, {PTB_ARCHIVE: _tgz({"train": TEXTS["train"]})})
    with pytest.raises(MissingDataError, match=r"has no member .*ptb\.test\.txt"):
        PTBDataModule(folder).prepare_data()
    assert sorted(p.name for p in folder.iterdir()) == ["ptb.train.txt"]


def test_ptb_falls_back_to_github_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PTBDataModule, "spec", _spec_for(PTB_SPEC))
    routes: dict[str, Route] = {PTB_ARCHIVE: urllib.error.URLError("timed out")}
    routes.update({PTB_GITHUB[PTB_SPEC.files[s]]: data for s, data in TEXTS.items()})
    requested = _serve(monkeypatch, routes)
    dm = PTBDataModule(tmp_path / "ptb")
    dm.prepare_data()
    assert requested == PTB_SPEC.mirror_urls()
    for split, data in TEXTS.items():
        assert dm.path(split).read_bytes() == data


def test_missing_files_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REVRNN_DATA_DIR", raising=False)
    requested = _serve(monkeypatch, {})
    folder = tmp_path / "ptb"
    for download in (False, True):
        with pytest.raises(MissingDataError) as info:
            PTBDataModule(folder, download=download).prepare_data()
        message = str(info.value)
        for name in PTB_SPEC.files.values():
            assert name in message
        assert all(url in message for url in PTB_SPEC.mirror_urls()) and "REVRNN_DATA_DIR" in message
        assert ("download=False" in message) == (not download)
    assert requested == PTB_SPEC.mirror_urls()  # download=False never touches the network
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
