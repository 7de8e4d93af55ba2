"""Fixtures for the DataModule tests (helpers live in ``dm_helpers``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # lets test files import dm_helpers under any --import-mode
    sys.path.insert(0, str(Path(__file__).parent))

from dm_helpers import small_text, write_corpus

from lightning_revrnn.datamodules import PTBDataModule


@pytest.fixture
def small_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny PTB-layout corpus in ``tmp_path/ptb`` with ``PTBDataModule.spec`` patched to its hashes."""
    folder = tmp_path / "ptb"
    spec = write_corpus(folder, {"train": small_text(120, 1), "valid": small_text(30, 2), "test": small_text(30, 3)})
    monkeypatch.setattr(PTBDataModule, "spec", spec)
    return folder
