"""IWSLT 2016 TED English→German: training text from WIT3, validation tst2013, test tst2014.

``data_dir`` (default ``$REVRNN_DATA_DIR/iwslt2016-de-en``, else the cache) holds the dev/test XML files
``IWSLT16.TED.tst201{3,4}.de-en.{en,de}.xml`` (993 and 1,305 segments; SHA-256 checked) and the training text
in one of these forms, the first present being used (:data:`TRAINING_SOURCES`):

1. ``train.tags.de-en.en`` and ``train.tags.de-en.de``, extracted (as torchtext's ``.data/iwslt/de-en/`` has them);
2. ``de-en.tgz``, the WIT3 archive ``2016-01/texts/de/en/de-en.tgz`` (the one these dev/test files come from);
3. ``en-de.tgz``, the WIT3 archive ``2016-01/texts/en/de/en-de.tgz`` (members ``en-de/train.tags.en-de.*``).

Forms 1 and 2 are verified by their git blob ids (``git hash-object FILE``), the only published hashes of these
files; form 3 has none, so it is only checked to be a readable archive with the two members. The training
pairs (196,884 in the de-en release) lose their metadata lines, and all text is Moses-tokenised and
lower-cased once, then cached (:mod:`.iwslt_text`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from typing_extensions import override

from .download import (
    DATA_DIR_ENV,
    FETCH_ERRORS,
    ArchiveMirror,
    CorpusSpec,
    _download,
    _failure,
    default_data_dir,
    ensure_files,
    read_verified,
)
from .errors import ChecksumMismatchError, CorpusFormatError, MissingDataError
from .iwslt_text import aligned_segments, cached_tokenization, tokenized_pairs, training_sentences, user_cache_dir
from .parallel import ParallelText
from .preprocessing import IWSLT_PREPROCESSING
from .translation_datamodule import TranslationDataModule

WIT3_TEXTS = "https://wit3.fbk.eu/archive/2016-01/texts"
"""WIT3's folder of the 2016-01 release (one archive per language pair)."""
GOOGLE_DRIVE_RELEASE = "https://drive.google.com/uc?id=1l5y6Giag9aRPwGtuZHswh3w5v3qEz8D8"
"""The whole 2016-01 release as one ``2016-01.tgz`` (what torchtext downloads; holds ``texts/de/en/de-en.tgz``)."""

_XML_FILES = {
    f"{split}.{lang}": f"IWSLT16.TED.{year}.de-en.{lang}.xml"
    for split, year in (("valid", "tst2013"), ("test", "tst2014"))
    for lang in ("en", "de")
}

IWSLT2016_SPEC = CorpusSpec(
    name="IWSLT 2016 TED dev/test (tst2013, tst2014)",
    subdir="iwslt2016-de-en",
    files=_XML_FILES,
    sha256={
        "IWSLT16.TED.tst2013.de-en.en.xml": "479fec5ca4c5e8b8fe7932f639909d925987a9fb37db17e425aacf64707c70bb",
        "IWSLT16.TED.tst2013.de-en.de.xml": "5b74a7292fcb8f71cf6de9bcf9c9a24b87ab2904fd8c4b73c1e81f353f79b407",
        "IWSLT16.TED.tst2014.de-en.en.xml": "bcbbf0904ee6275aa8ba1636ff2211e0621ba7f5c92bf2292b1e27671219cc9e",
        "IWSLT16.TED.tst2014.de-en.de.xml": "e9b233372416169e3b36391b1d9005ba2a28bf51751f406171b59e09a9018f9e",
    },
    mirrors=(ArchiveMirror(f"{WIT3_TEXTS}/de/en/de-en.tgz", "tgz", {n: f"de-en/{n}" for n in _XML_FILES.values()}),),
)
"""The dev/test XML files (the de-en release's, from its archive)."""


@dataclass(frozen=True)
class TrainingSource:
    """One accepted form of the training text in ``data_dir``."""

    files: tuple[str, ...]
    """File names: one archive, or the two extracted ``train.tags`` files (English first)."""
    pair: str
    """Language pair of the WIT3 release, as in the member names (``"de-en"``)."""
    git_blobs: Mapping[str, str] = field(default_factory=dict)
    """File name to its published git blob id (empty: no published hash)."""
    url: str | None = None
    """Where an archive can be downloaded (``None``: not downloadable as such)."""

    def member(self, lang: str) -> str:
        """Name of the training file of ``lang`` (in the archive, any folder)."""
        return f"train.tags.{self.pair}.{lang}"


TRAINING_SOURCES = (
    TrainingSource(
        ("train.tags.de-en.en", "train.tags.de-en.de"),
        "de-en",
        {
            "train.tags.de-en.en": "e1ae5f9ef436a9f4278dae79cca70b0cda1c8d3b",
            "train.tags.de-en.de": "e377256e5d7e2aa1d5518051db5bce8ecc568a8f",
        },
    ),
    TrainingSource(
        ("de-en.tgz",),
        "de-en",
        {"de-en.tgz": "dc7bd534272f5b225ae190669b1e873c42a6d03d"},
        f"{WIT3_TEXTS}/de/en/de-en.tgz",
    ),
    TrainingSource(("en-de.tgz",), "en-de", {}, f"{WIT3_TEXTS}/en/de/en-de.tgz"),
)
"""The forms of the training text, in order of preference (and of download)."""


def git_blob_id(data: bytes) -> str:
    """The id git gives ``data`` as a file (``git hash-object``): SHA-1 of ``b"blob <size>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _blob_mismatch(name: str, data: bytes, source: TrainingSource) -> str | None:
    """What is wrong with ``data`` as ``source``'s file ``name`` (``None``: its git blob id is right or unknown)."""
    expected = source.git_blobs.get(name)
    if expected is None or (actual := git_blob_id(data)) == expected:
        return None
    return f"git blob id {actual}, expected {expected}"


def _verify_blob(path: Path, data: bytes, source: TrainingSource) -> None:
    if (problem := _blob_mismatch(path.name, data, source)) is not None:
        raise ChecksumMismatchError(
            f"Checksum mismatch for {path}: {problem} (`git hash-object {path.name}`). The file is corrupt, "
            f"truncated or another version of the IWSLT 2016 training data. Delete it (rm {path}) and download it "
            f"again ({source.url or GOOGLE_DRIVE_RELEASE}), or replace it with a good copy."
        )


def _archive_members(data: bytes, path: Path, source: TrainingSource) -> tuple[bytes, bytes]:
    """The English and German training files inside an archive's bytes."""
    wanted = {source.member(lang): lang for lang in ("en", "de")}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for info in tar:
                lang = wanted.get(info.name.rsplit("/", 1)[-1])
                if lang is None or not info.isfile():
                    continue
                extracted = tar.extractfile(info)
                if extracted is not None:
                    found[lang] = extracted.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CorpusFormatError(
            f"{path}: not a readable .tgz archive ({_failure(err)}); delete it and download it again ({source.url})."
        ) from None
    absent = [member for member, lang in wanted.items() if lang not in found]
    if absent:
        raise CorpusFormatError(
            f"{path}: the archive has no member {absent} (any folder); it is not the WIT3 "
            f"2016-01 {source.pair} release ({source.url})."
        )
    return found["en"], found["de"]


class IWSLT2016DataModule(TranslationDataModule):
    """IWSLT 2016 TED English→German: train (WIT3 training text), valid tst2013 (993), test tst2014 (1,305).

    :meth:`prepare_data` checks the dev/test files (downloading missing ones from the WIT3 archive, or taking
    them from a ``de-en.tgz`` already in ``data_dir``), finds or downloads the training text (see the module
    docstring) and tokenises everything once into a cache: ``data_dir/tokenized/`` when writable, else
    ``~/.cache/lightning-revrnn/iwslt2016-de-en/tokenized/``. Missing training text raises an error naming the
    files, the URLs and where to put them.

    Args:
        data_dir: the folder of the files (default: see above).
        batch_size: sentence pairs per batch over all ranks.
        min_freq: fewest training occurrences a word needs for an id of its own (else UNK).
        max_vocab: most ids per language, the four specials included (``None``: no limit).
        max_len: longest training sentence kept, in tokens (evaluation keeps every pair).
        num_workers: ``DataLoader`` workers.
        seed: seeds the per-epoch bucketing and shuffling (with the epoch).
        download: fetch missing files in :meth:`prepare_data`.

    Example (the data lines need the corpus in ``$REVRNN_DATA_DIR/iwslt2016-de-en`` or a download)::

        >>> dm = IWSLT2016DataModule(batch_size=64, max_vocab=50000, max_len=50)
        >>> dm.spec.files["test.de"]
        'IWSLT16.TED.tst2014.de-en.de.xml'
        >>> dm.prepare_data()  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> len(dm.pairs("valid")), dm.tgt_vocab_size <= 50000  # doctest: +SKIP
        (993, True)
        >>> batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> len(batch), batch.src.shape[0] <= 50  # doctest: +SKIP
        (64, True)
    """

    spec = IWSLT2016_SPEC
    text_preprocessing = IWSLT_PREPROCESSING
    training_sources = TRAINING_SOURCES

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        min_freq: int = 1,
        max_vocab: int | None = 50000,
        max_len: int = 50,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        """``data_dir``: see the class docstring (default ``$REVRNN_DATA_DIR/iwslt2016-de-en``, else
        ``~/.cache/lightning-revrnn/iwslt2016-de-en``); ``download``: fetch missing files in :meth:`prepare_data`."""
        super().__init__(batch_size, min_freq, max_vocab, max_len, num_workers, seed)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(self.spec.subdir)
        self.download = bool(download)
        self._warned_unverified = False

    @property
    def cache_dirs(self) -> list[Path]:
        """Where tokenised text is looked up and written, in order."""
        return [self.data_dir / "tokenized", user_cache_dir(f"{self.spec.subdir}/tokenized")]

    # ------------------------------------------------------------------ files
    def _xml_from_local_archive(self) -> None:
        """Extract missing dev/test files from a ``de-en.tgz`` already in ``data_dir`` (checksummed; no download,
        so also with ``download=False``); if that fails, the normal checks below report the files missing."""
        local = self.data_dir / "de-en.tgz"
        if not local.is_file() or all((self.data_dir / n).is_file() for n in self.spec.files.values()):
            return
        archive = ArchiveMirror(local.resolve().as_uri(), "tgz", {n: f"de-en/{n}" for n in self.spec.files.values()})
        with contextlib.suppress(MissingDataError):
            ensure_files(replace(self.spec, mirrors=(archive,)), self.data_dir, download=True)

    def training_source(self) -> TrainingSource | None:
        """The first form of the training text that is complete in ``data_dir`` (``None``: none is)."""
        for source in self.training_sources:
            if all((self.data_dir / name).is_file() for name in source.files):
                return source
        return None

    def missing_training_error(self, reason: str) -> MissingDataError:
        """The error for absent training text: every accepted file, its URL and where to put it."""
        options = []
        for source in self.training_sources:
            names = " and ".join(source.files)
            where = f"download {source.url}" if source.url else "extract them from de-en.tgz"
            blob = ", ".join(f"git blob id {b}" for b in source.git_blobs.values())
            options.append(f"{names} ({where}{'; ' + blob if blob else ''})")
        env = os.environ.get(DATA_DIR_ENV)
        return MissingDataError(
            f"IWSLT 2016 training text missing in {self.data_dir}. {reason} To fix, put one of these into "
            f"{self.data_dir}: " + "; or ".join(options) + f". The whole 2016-01 release is also at "
            f"{GOOGLE_DRIVE_RELEASE} (2016-01.tgz; de-en.tgz is inside as texts/de/en/de-en.tgz). Or set "
            f"{DATA_DIR_ENV} to a folder holding {self.spec.subdir}/ with them "
            f"({'currently ' + repr(env) if env else 'not set'}), or pass data_dir= to the DataModule."
        )

    def _download_training_archive(self) -> None:
        failures = []
        for source in self.training_sources:
            if source.url is None:
                continue
            target = self.data_dir / source.files[0]
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                tmp = _download(source.url, self.data_dir, ".tgz")
            except FETCH_ERRORS as err:
                failures.append(f"{source.url}: {_failure(err)}")
                continue
            try:
                data = tmp.read_bytes()
                problem = _blob_mismatch(target.name, data, source)
                if problem is None:
                    _archive_members(data, target, source)
                    os.replace(tmp, target)
                    return
                failures.append(f"{source.url}: checksum mismatch: {problem} (not kept)")
            except CorpusFormatError as err:
                failures.append(f"{source.url}: {err} (not kept)")
            finally:
                tmp.unlink(missing_ok=True)
        tried = "".join(f"\n  {i}. {line}" for i, line in enumerate(failures, 1))
        raise self.missing_training_error(f"Every download failed:{tried}\n")

    @override
    def prepare_data(self) -> None:
        """Check (and fetch) the dev/test files and the training text, then tokenise all splits once (cached)."""
        self._xml_from_local_archive()
        ensure_files(self.spec, self.data_dir, download=self.download)
        if self.training_source() is None:
            if not self.download:
                raise self.missing_training_error("Automatic download is disabled (download=False).")
            self._download_training_archive()
        for split in ("train", "valid", "test"):
            self.read_split(split)

    # ------------------------------------------------------------------ text
    def _training_text(self) -> ParallelText:
        source = self.training_source()
        if source is None:
            raise self.missing_training_error(
                "setup() found none (prepare_data() downloads the archive; a Trainer calls it first)."
            )
        paths = [self.data_dir / name for name in source.files]
        raw = [p.read_bytes() for p in paths]
        for path, data in zip(paths, raw):
            _verify_blob(path, data, source)
        if not source.git_blobs and not self._warned_unverified:
            self._warned_unverified = True
            warnings.warn(
                f"{paths[0]} has no published checksum; it is used after checking its members only.", stacklevel=2
            )
        digest = "+".join(hashlib.sha256(data).hexdigest() for data in raw)

        def tokenize() -> ParallelText:
            if len(raw) == 2:  # the extracted files, English first
                files = dict(zip(("en", "de"), raw))
                names = {lang: str(p) for lang, p in zip(("en", "de"), paths)}
            else:
                files = dict(zip(("en", "de"), _archive_members(raw[0], paths[0], source)))
                names = {lang: f"{paths[0]}:{source.member(lang)}" for lang in ("en", "de")}
            src, tgt = self.src_lang, self.tgt_lang
            sources, targets = training_sentences(files[src], files[tgt], names[src], names[tgt])
            return tokenized_pairs(sources, targets, self.src_lang, self.tgt_lang)

        return cached_tokenization(self.cache_dirs, "train", digest, (self.src_lang, self.tgt_lang), tokenize)

    def _xml_bytes(self, key: str) -> bytes:
        return read_verified(self.spec, self.data_dir, self.spec.files[key])

    def _dev_test_text(self, split: str) -> ParallelText:
        keys = (f"{split}.{self.src_lang}", f"{split}.{self.tgt_lang}")
        src, tgt = (self._xml_bytes(k) for k in keys)
        digest = "+".join(hashlib.sha256(data).hexdigest() for data in (src, tgt))

        def tokenize() -> ParallelText:
            names = [str(self.data_dir / self.spec.files[k]) for k in keys]
            sources, targets = aligned_segments(src, tgt, names[0], names[1])
            text = tokenized_pairs(sources, targets, self.src_lang, self.tgt_lang)
            if len(text) != len(sources):
                raise CorpusFormatError(
                    f"{names[0]}: {len(sources) - len(text)} segments tokenise to nothing; "
                    "dev/test sets must keep every segment. The file is corrupt."
                )
            return text

        return cached_tokenization(self.cache_dirs, split, digest, (self.src_lang, self.tgt_lang), tokenize)

    @override
    def read_split(self, split: str) -> ParallelText:
        """Tokenised, lower-cased pairs of ``split`` (from the cache when there)."""
        if split == "train":
            return self._training_text()
        if split in ("valid", "test"):
            return self._dev_test_text(split)
        raise ValueError(f"unknown split {split!r}; expected 'train', 'valid' or 'test'")
