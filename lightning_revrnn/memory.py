"""Measuring what a forward pass keeps alive for backward.

On CPU there is no allocator peak to read, so activation memory is measured as the bytes of every tensor
autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage
(views and repeated saves of one tensor share storage) and leaving out parameters, which live anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SavedBytes:
    """Result of :func:`saved_tensor_bytes`: ``total`` bytes over ``storages`` distinct storages."""

    total: int = 0
    storages: int = 0
    _seen: set[tuple[torch.device, int]] = field(default_factory=set, repr=False)


def _storage_key(t: Tensor) -> tuple[torch.device, int]:
    return (t.device, t.untyped_storage().data_ptr())


@contextmanager
def saved_tensor_bytes(exclude: Iterable[Tensor] = ()) -> Iterator[SavedBytes]:
    """Count the bytes autograd saves for backward inside the block, deduplicated by storage.

    Args:
        exclude: tensors whose storages are not counted (pass the model's parameters).

    Example::

        with saved_tensor_bytes(model.parameters()) as saved:
            loss = model(x).sum()
        print(saved.total)
    """
    result = SavedBytes()
    result._seen.update(_storage_key(p) for p in exclude)

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in result._seen and t.untyped_storage().data_ptr() != 0:
            result._seen.add(key)
            result.total += t.untyped_storage().nbytes()
            result.storages += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
