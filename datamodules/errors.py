"""Exceptions raised by the DataModules: each names the file involved and how to fix the problem."""

from __future__ import annotations


class DataError(Exception):
    """Base class of every data problem raised by :mod:`lightning_revrnn.datamodules`."""


class MissingDataError(DataError, FileNotFoundError):
    """Corpus files are absent and could not (or may not) be downloaded."""


class ChecksumMismatchError(DataError, ValueError):
    """A corpus file's SHA-256 differs from the expected one (corrupt, truncated or a different version)."""


class CorpusFormatError(DataError, ValueError):
    """A corpus file cannot be used as text: invalid UTF-8 or no tokens at all."""


class UnknownTokenError(CorpusFormatError):
    """An evaluation split holds a token that is not in the (closed) training vocabulary."""
