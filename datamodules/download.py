"""Locating, verifying and downloading corpus files.

Files that are present are checked against their SHA-256. Missing files are fetched from the canonical
archive with :func:`urllib.request.urlopen` into a temporary file in the data folder, extracted into
temporary files there, verified, and only then moved to their final names with :func:`os.replace`, so an
interrupted download never leaves a file that passes as complete.
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
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from .errors import ChecksumMismatchError, MissingDataError

DATA_DIR_ENV = "REVRNN_DATA_DIR"
"""Environment variable naming a folder that holds one sub-folder per corpus (``ptb/``, ``wikitext-2/``)."""

CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CorpusSpec:
    """Where a corpus comes from and what its files must hash to."""

    name: str
    """Human-readable name, e.g. ``"PTB"``."""
    subdir: str
    """Sub-folder of ``$REVRNN_DATA_DIR`` / of the cache, e.g. ``"ptb"``."""
    url: str
    """Canonical archive URL."""
    archive: Literal["tgz", "zip"]
    """Archive format at :attr:`url`."""
    files: Mapping[str, str]
    """Split name (``train``/``valid``/``test``) to file name."""
    members: Mapping[str, str]
    """File name to its member path inside the archive (a leading ``./`` is ignored when matching)."""
    sha256: Mapping[str, str]
    """File name to expected SHA-256 (hex)."""


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
        f"it from {spec.url}, or replace it with a good copy."
    )


def verify_bytes(path: Path, data: bytes, spec: CorpusSpec) -> None:
    """Check already-read ``data`` of ``path`` against ``spec``'s hash (files without one pass)."""
    expected = spec.sha256.get(path.name)
    if expected is not None:
        actual = sha256_bytes(data)
        if actual != expected:
            raise checksum_error(path, expected, actual, spec)


def verify_file(path: Path, spec: CorpusSpec) -> None:
    """Check ``path`` against ``spec``'s hash (files without one pass)."""
    expected = spec.sha256.get(path.name)
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise checksum_error(path, expected, actual, spec)


def missing_error(spec: CorpusSpec, data_dir: Path, missing: Iterable[str], reason: str) -> MissingDataError:
    """One clear error naming the missing files, the URL, and :data:`DATA_DIR_ENV`."""
    names = sorted(missing)
    paths = ", ".join(str(data_dir / n) for n in names)
    members = ", ".join(spec.members[n] for n in names)
    env = os.environ.get(DATA_DIR_ENV)
    env_note = f"currently {DATA_DIR_ENV}={env!r}" if env else f"{DATA_DIR_ENV} is not set"
    return MissingDataError(
        f"{spec.name} data missing: {paths}. {reason} To fix: download {spec.url} and extract {members} "
        f"into {data_dir}; or set {DATA_DIR_ENV} to a folder holding {spec.subdir}/"
        f"{{{','.join(names)}}} ({env_note}); or pass data_dir= to the DataModule."
    )


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _fetch(url: str, dest: IO[bytes]) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        shutil.copyfileobj(response, dest, CHUNK)


def _open_members(archive_path: Path, spec: CorpusSpec, wanted: Mapping[str, str]) -> dict[str, bytes]:
    """Read ``wanted`` (file name -> normalised member name) from the downloaded archive."""
    by_member = {member: fname for fname, member in wanted.items()}
    out: dict[str, bytes] = {}
    if spec.archive == "tgz":
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


def download_files(spec: CorpusSpec, data_dir: Path, names: Iterable[str]) -> None:
    """Download ``spec``'s archive and install the files ``names`` into ``data_dir``, atomically.

    Every extracted file is verified before it gets its final name; nothing partial is left behind.

    Raises:
        MissingDataError: the download or extraction failed, or a member is absent from the archive.
        ChecksumMismatchError: an extracted file does not hash to the expected value.
    """
    names = sorted(names)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".download.", suffix=f".{spec.archive}.part", dir=data_dir)
    except OSError as err:
        raise missing_error(spec, data_dir, names, f"Cannot write to {data_dir} ({err}).") from err
    archive_path = Path(tmp)
    try:
        try:
            with os.fdopen(fd, "wb") as fh:
                _fetch(spec.url, fh)
            contents = _open_members(archive_path, spec, {n: _member_name(spec.members[n]) for n in names})
        except (OSError, urllib.error.URLError, tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError) as err:
            raise missing_error(
                spec, data_dir, names, f"Downloading {spec.url} failed ({type(err).__name__}: {err})."
            ) from err
        absent = [n for n in names if n not in contents]
        if absent:
            members = [spec.members[n] for n in absent]
            raise missing_error(spec, data_dir, absent, f"The archive from {spec.url} has no member {members}.")
        for name in names:
            data = contents[name]
            expected = spec.sha256.get(name)
            actual = sha256_bytes(data)
            if expected is not None and actual != expected:
                raise ChecksumMismatchError(
                    f"Downloaded {spec.members[name]} from {spec.url} has sha256 {actual}, expected {expected}; "
                    f"{data_dir / name} was not written. The archive is corrupt or a different version; "
                    "try again later, or place a verified copy there yourself."
                )
        for name in names:
            _atomic_write(data_dir / name, contents[name])
    finally:
        with suppress(OSError):
            archive_path.unlink()


def ensure_files(spec: CorpusSpec, data_dir: Path, download: bool = True) -> dict[str, Path]:
    """Make sure every file of ``spec`` is in ``data_dir`` and hashes correctly; return split -> path.

    Present files are verified (a mismatch raises :class:`ChecksumMismatchError` naming the file, the expected
    and actual hashes, and the fix). Missing ones are downloaded if ``download``; otherwise, or if that fails,
    one :class:`MissingDataError` names them, the URL and :data:`DATA_DIR_ENV`.
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
