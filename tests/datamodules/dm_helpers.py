"""Helpers for the DataModule tests: the shared data folder, tiny corpora, simulated DDP ranks.

A uniquely named module (not ``conftest``) so that test files can import it unambiguously.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_revrnn.datamodules import PTB_SPEC, CorpusSpec

SHARED_DATA = Path(os.environ.get("REVRNN_DATA_DIR", "/work/shared/data"))


def shared_corpus_dir(subdir: str, files: list[str]) -> Path:
    """``SHARED_DATA/subdir``, or skip the test with the reason when its files are absent."""
    folder = SHARED_DATA / subdir
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        pytest.skip(f"shared corpus not available: {folder} lacks {missing} (set REVRNN_DATA_DIR to the data folder)")
    return folder


def fake_trainer(rank: int, world_size: int, epoch: int | None = None) -> SimpleNamespace:
    """What the DataModules read from an attached Trainer, for simulating a DDP rank."""
    trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
    if epoch is not None:
        trainer.current_epoch = epoch
    return trainer


def write_corpus(folder: Path, texts: dict[str, bytes], spec: CorpusSpec = PTB_SPEC) -> CorpusSpec:
    """Write ``texts`` (split -> bytes) under ``spec``'s file names; return ``spec`` with their hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    hashes = dict(spec.sha256)
    for split, data in texts.items():
        name = spec.files[split]
        (folder / name).write_bytes(data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    return dataclasses.replace(spec, sha256=hashes)


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house", "N", "<unk>"]


def small_text(lines: int, seed: int, words: list[str] = WORDS) -> bytes:
    """A deterministic PTB-style text (leading space, words, newline per line)."""
    out = []
    state = seed * 7919 + 1
    for _line in range(lines):
        n = 3 + (state % 9)
        line = []
        for _ in range(n):
            state = (state * 1103515245 + 12345) % (1 << 31)
            line.append(words[state % len(words)])
        out.append(" " + " ".join(line) + " \n")
    return "".join(out).encode()
