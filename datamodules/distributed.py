"""Which process this is (rank / world size) and which slice of a global batch it owns."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_and_world_size(trainer: Any | None = None) -> tuple[int, int]:
    """``(global_rank, world_size)`` of this process.

    Taken from ``trainer`` when one is attached (``trainer.global_rank`` / ``trainer.world_size``), else from
    :mod:`torch.distributed` when its default process group is initialised, else ``(0, 1)``.
    """
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_divisible(global_batch: int, world_size: int, name: str) -> None:
    """Raise a clear :class:`ValueError` unless ``global_batch`` splits evenly over ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_batch % world_size != 0:
        lower = global_batch - global_batch % world_size
        upper = lower + world_size
        options = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ValueError(
            f"{name}={global_batch} is the global batch (streams summed over all processes) and must be "
            f"divisible by the world size {world_size} so that every rank gets the same number of streams; "
            f"use e.g. {name}={options}."
        )


def shard_range(global_batch: int, rank: int, world_size: int, name: str = "batch_size") -> tuple[int, int]:
    """Columns ``[lo, hi)`` of a ``global_batch``-wide batch owned by ``rank``: ``[r*B/W, (r+1)*B/W)``."""
    check_divisible(global_batch, world_size, name)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    local = global_batch // world_size
    return rank * local, (rank + 1) * local
