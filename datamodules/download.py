"""Locating, verifying and downloading corpus files.

Files that are present are checked against their SHA-256. Missing files are fetched from an ordered list of
mirrors (:class:`ArchiveMirror`: one archive holding every file; :class:`FileMirror`: one URL per file): each
download goes with :func:`urllib.request.urlopen` into a temporary file in the data folder, every file is
verified against the one SHA-256 of the spec, and only a verified file is moved to its final name with
:func:`os.replace`, so an interrupted or corrupt download never leaves a file that passes as complete. A mirror
that fails (unreachable, HTTP error, broken archive, missing member, wrong checksum) is recorded and the next
one is tried; when all fail, one :class:`~.errors.MissingDataError` lists every URL with its failure and says
where to put the files by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from .errors import ChecksumMismatchError, MissingDataError

DATA_DIR_ENV = "REVRNN_DATA_DIR"
"""Environment variable naming a folder that holds one sub-folder per corpus (``ptb/``, ``wikitext-2/``)."""

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0

FETCH_ERRORS = (OSError, urllib.error.URLError, tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError)
"""What a failed download or a broken archive raises (``HTTPError`` and timeouts are ``OSError`` too)."""


@dataclass(frozen=True)
class ArchiveMirror:
    """One archive (``.tgz`` or ``.zip``) that holds every file of a corpus.

    Example::

        >>> mirror = ArchiveMirror(
        ...     url="https://example.org/simple-examples.tgz", archive="tgz",
        ...     members={"ptb.train.txt": "./simple-examples/data/ptb.train.txt"},
        ... )
        >>> mirror.urls(["ptb.train.txt", "ptb.valid.txt"])  # one download serves every file
        ['https://example.org/simple-examples.tgz']
    """

    url: str
    """Archive URL."""
    archive: Literal["tgz", "zip"]
    """Archive format."""
    members: Mapping[str, str]
    """File name to its member path inside the archive (a leading ``./`` is ignored when matching)."""

    def urls(self, names: Iterable[str]) -> list[str]:
        """The URLs that fetching ``names`` downloads (the archive's, once)."""
        return [self.url]


@dataclass(frozen=True)
class FileMirror:
    """A mirror serving each file of a corpus as a plain (uncompressed) file at its own URL.

    Example::

        >>> mirror = FileMirror({"train.txt": "https://example.org/train", "test.txt": "https://example.org/test"})
        >>> mirror.urls(["train.txt", "valid.txt"])  # only the files it serves
        ['https://example.org/train']
    """

    file_urls: Mapping[str, str]
    """File name to the URL of its copy."""

    def urls(self, names: Iterable[str]) -> list[str]:
        """The URLs that fetching ``names`` downloads (one per file)."""
        return [self.file_urls[n] for n in sorted(names) if n in self.file_urls]


Mirror = ArchiveMirror | FileMirror


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from and what its files must hash to.

    :func:`ensure_files` takes a spec and a folder: it verifies the files present and downloads the missing
    ones from :attr:`mirrors`, in order (the text corpora set one as their DataModule's ``spec``).

    Example::

        >>> import tempfile
        >>> spec = CorpusSpec(
        ...     name="Tiny", subdir="tiny", files={"train": "train.txt"},
        ...     sha256={"train.txt": sha256_bytes(b"a b c\\n")},
        ...     mirrors=(FileMirror({"train.txt": "https://example.org/tiny/train.txt"}),),
        ... )
        >>> spec.mirror_urls()
        ['https://example.org/tiny/train.txt']
        >>> with tempfile.TemporaryDirectory() as folder:  # the file is present: verified, nothing downloaded
        ...     _ = (Path(folder) / "train.txt").write_bytes(b"a b c\\n")
        ...     print(ensure_files(spec, Path(folder), download=False)["train"].name)
        train.txt
    """

    name: str
    """Human-readable name, e.g. ``"PTB"``."""
    subdir: str
    """Sub-folder of ``$REVRNN_DATA_DIR`` / of the cache, e.g. ``"ptb"``."""
    files: Mapping[str, str]
    """Split name (``train``/``valid``/``test``) to file name."""
    sha256: Mapping[str, str]
    """File name to expected SHA-256 (hex); every mirror's copy must hash to it."""
    mirrors: tuple[Mirror, ...] = field(default=())
    """Sources tried in order until every missing file is installed."""

    def mirror_urls(self, names: Iterable[str] | None = None) -> list[str]:
        """Every URL that downloading ``names`` (default: all files) may touch, in the order tried."""
        wanted = sorted(self.files.values()) if names is None else sorted(names)
        return [url for mirror in self.mirrors for url in mirror.urls(wanted)]


def default_data_dir(subdir: str) -> Path:
    """``$REVRNN_DATA_DIR/<subdir>`` if set, else ``<$XDG_CACHE_HOME or ~/.cache>/lightning-revrnn/<subdir>``."""
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        return Path(root).expanduser() / subdir
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "lightning-revrnn" / subdir


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_error(path: Path, expected: str, actual: str, spec: CorpusSpec) -> ChecksumMismatchError:
    """The error for a present file whose hash is wrong."""
    return ChecksumMismatchError(
        f"Checksum mismatch for {path}: expected sha256 {expected}, got {actual}. The file is corrupt, "
        f"truncated or a different version of {spec.name}. Delete it (rm {path}) and run again to re-download "
        f"it (tried in order: {', '.join(spec.mirror_urls([path.name]))}), or replace it with a good copy."
    )


def verify_bytes(path: Path, data: bytes, spec: CorpusSpec) -> None:
    """Check already-read ``data`` of ``path`` against ``spec``'s hash (files without one pass)."""
    expected = spec.sha256.get(path.name)
    if expected is not None:
        actual = sha256_bytes(data)
        if actual != expected:
            raise checksum_error(path, expected, actual, spec)


def read_verified(spec: CorpusSpec, data_dir: Path, name: str) -> bytes:
    """The bytes of ``data_dir / name``, checked against ``spec``'s hash; a missing file raises
    :func:`missing_error` (setup() found it absent: prepare_data() downloads it)."""
    path = data_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing_error(
            spec,
            data_dir,
            [path.name],
            "setup() found it absent (prepare_data() downloads missing files; a Trainer calls it first).",
        ) from None
    verify_bytes(path, data, spec)
    return data


def verify_file(path: Path, spec: CorpusSpec) -> None:
    """Check ``path`` against ``spec``'s hash (files without one pass)."""
    expected = spec.sha256.get(path.name)
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise checksum_error(path, expected, actual, spec)


def missing_error(spec: CorpusSpec, data_dir: Path, missing: Iterable[str], reason: str) -> MissingDataError:
    """One clear error naming the missing files, where to get them, and where to put them by hand."""
    names = sorted(missing)
    paths = ", ".join(str(data_dir / n) for n in names)
    env = os.environ.get(DATA_DIR_ENV)
    env_note = f"currently {DATA_DIR_ENV}={env!r}" if env else f"{DATA_DIR_ENV} is not set"
    hashes = ", ".join(f"{n} {spec.sha256[n]}" for n in names if n in spec.sha256)
    sources = "; ".join(_describe(m, names) for m in spec.mirrors) or "no download source is known"
    return MissingDataError(
        f"{spec.name} data missing: {paths}. {reason} To fix: get the files from one of these sources "
        f"({sources}) and put them into {data_dir} (expected sha256: {hashes}); or set {DATA_DIR_ENV} to a "
        f"folder holding {spec.subdir}/{{{','.join(names)}}} ({env_note}); or pass data_dir= to the DataModule."
    )


def _describe(mirror: Mirror, names: list[str]) -> str:
    if isinstance(mirror, ArchiveMirror):
        members = ", ".join(mirror.members[n] for n in names if n in mirror.members)
        return f"{mirror.url}, extract {members}"
    return ", ".join(f"{url} as {name}" for name, url in sorted(mirror.file_urls.items()) if name in names)


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _fetch(url: str, dest: IO[bytes]) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        shutil.copyfileobj(response, dest, CHUNK)


def _open_members(archive_path: Path, mirror: ArchiveMirror, wanted: Mapping[str, str]) -> dict[str, bytes]:
    """Read ``wanted`` (file name -> normalised member name) from the downloaded archive."""
    by_member = {member: fname for fname, member in wanted.items()}
    out: dict[str, bytes] = {}
    if mirror.archive == "tgz":
        with tarfile.open(archive_path, "r:*") as tar:
            for info in tar:
                fname = by_member.get(_member_name(info.name))
                if fname is not None and info.isfile():
                    extracted = tar.extractfile(info)
                    if extracted is not None:
                        out[fname] = extracted.read()
    else:
        with zipfile.ZipFile(archive_path) as zf:
            for zinfo in zf.infolist():
                fname = by_member.get(_member_name(zinfo.filename))
                if fname is not None and not zinfo.is_dir():
                    out[fname] = zf.read(zinfo)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _download(url: str, data_dir: Path, suffix: str) -> Path:
    """Download ``url`` into a new temporary file in ``data_dir`` (the caller deletes it)."""
    fd, tmp = tempfile.mkstemp(prefix=".download.", suffix=f"{suffix}.part", dir=data_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            _fetch(url, fh)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class _Attempts:
    """What each mirror URL delivered: verified files, and one failure line per URL that did not help."""

    def __init__(self, spec: CorpusSpec) -> None:
        self.spec = spec
        self.failures: list[str] = []

    def fail(self, url: str, reason: str) -> None:
        self.failures.append(f"{url}: {reason}")

    def verified(self, url: str, name: str, data: bytes, member: str) -> bool:
        """Whether ``data`` (``name`` as fetched from ``url``) has the spec's hash; a mismatch is recorded."""
        expected = self.spec.sha256.get(name)
        actual = sha256_bytes(data)
        if expected is not None and actual != expected:
            self.fail(url, f"checksum mismatch for {member}: sha256 {actual}, expected {expected} (not written)")
            return False
        return True


def _from_archive(mirror: ArchiveMirror, names: list[str], data_dir: Path, attempts: _Attempts) -> dict[str, bytes]:
    """The verified files among ``names`` that ``mirror``'s archive yields (failures go to ``attempts``)."""
    try:
        archive_path = _download(mirror.url, data_dir, f".{mirror.archive}")
    except FETCH_ERRORS as err:
        attempts.fail(mirror.url, _failure(err))
        return {}
    try:
        contents = _open_members(archive_path, mirror, {n: _member_name(mirror.members[n]) for n in names})
    except FETCH_ERRORS as err:
        attempts.fail(mirror.url, f"unreadable {mirror.archive} archive ({_failure(err)})")
        return {}
    finally:
        with suppress(OSError):
            archive_path.unlink()
    absent = [mirror.members[n] for n in names if n not in contents]
    if absent:
        attempts.fail(mirror.url, f"the archive has no member {absent}")
    return {n: data for n, data in contents.items() if attempts.verified(mirror.url, n, data, mirror.members[n])}


def _from_files(mirror: FileMirror, names: list[str], data_dir: Path, attempts: _Attempts) -> dict[str, bytes]:
    """The verified files among ``names`` that ``mirror`` serves (failures go to ``attempts``)."""
    out: dict[str, bytes] = {}
    for name in names:
        url = mirror.file_urls.get(name)
        if url is None:
            continue
        try:
            path = _download(url, data_dir, "")
        except FETCH_ERRORS as err:
            attempts.fail(url, _failure(err))
            continue
        try:
            data = path.read_bytes()
        finally:
            with suppress(OSError):
                path.unlink()
        if attempts.verified(url, name, data, name):
            out[name] = data
    return out


def download_files(spec: CorpusSpec, data_dir: Path, names: Iterable[str]) -> None:
    """Install the files ``names`` of ``spec`` into ``data_dir`` from its mirrors, tried in order.

    Each mirror is asked only for the files still missing; every file is verified against ``spec.sha256``
    before it gets its final name (atomically), so nothing partial or corrupt is left behind.

    Raises:
        MissingDataError: the data folder is not writable, or some file came from no mirror; the message lists
            every URL tried with its failure and where to put the files by hand.
    """
    remaining = sorted(names)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe_fd, probe = tempfile.mkstemp(prefix=".download.", suffix=".probe", dir=data_dir)
        os.close(probe_fd)
        os.unlink(probe)
    except OSError as err:
        raise missing_error(spec, data_dir, remaining, f"Cannot write to {data_dir} ({err}).") from err
    attempts = _Attempts(spec)
    for mirror in spec.mirrors:
        if isinstance(mirror, ArchiveMirror):
            wanted = [n for n in remaining if n in mirror.members]
            got = _from_archive(mirror, wanted, data_dir, attempts) if wanted else {}
        else:
            got = _from_files(mirror, remaining, data_dir, attempts)
        for name, data in got.items():
            _atomic_write(data_dir / name, data)
        remaining = [n for n in remaining if n not in got]
        if not remaining:
            return
    tried = "".join(f"\n  {i}. {line}" for i, line in enumerate(attempts.failures, 1))
    raise missing_error(spec, data_dir, remaining, f"Every download source failed:{tried}\n")


def ensure_files(spec: CorpusSpec, data_dir: Path, download: bool = True) -> dict[str, Path]:
    """Make sure every file of ``spec`` is in ``data_dir`` and hashes correctly; return split -> path.

    Present files are verified (a mismatch raises :class:`ChecksumMismatchError` naming the file, the expected
    and actual hashes, and the fix). Missing ones are downloaded from the mirrors if ``download``; otherwise, or
    if every mirror fails, one :class:`MissingDataError` names them, the URLs tried and :data:`DATA_DIR_ENV`.
    """
    paths = {split: data_dir / fname for split, fname in spec.files.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    for path in paths.values():
        if path.is_file():
            verify_file(path, spec)
    if missing:
        if not download:
            raise missing_error(spec, data_dir, missing, "Automatic download is disabled (download=False).")
        download_files(spec, data_dir, missing)
    return paths
