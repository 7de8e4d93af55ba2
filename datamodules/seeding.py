"""Deterministic, process-independent seeds for the generated (synthetic) data."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed from ``seed`` and ``labels`` (e.g. ``"train", epoch``), identical in every process.

    Unlike :func:`hash`, this does not depend on ``PYTHONHASHSEED``.
    """
    text = repr((int(seed), *labels)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *labels: object) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *labels))
