"""Iterable datasets yielding the shared batch contract.

Every item is a dict ``{"inputs": LongTensor (T, B), "targets": LongTensor (T, B), "reset": bool}``
(time-major). Targets equal to :data:`IGNORE_INDEX` are to be ignored by the loss. The datasets are
:class:`~torch.utils.data.IterableDataset` so that Lightning never injects a ``DistributedSampler``: each
rank's dataset already holds only that rank's columns. Use them with ``DataLoader(ds, batch_size=None)``
and ``num_workers=0`` (the data is a small in-memory tensor; several workers would each yield everything).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypedDict

import torch
from torch.utils.data import IterableDataset, get_worker_info

IGNORE_INDEX = -100
"""Target value meaning "no prediction here" (the default ``ignore_index`` of ``cross_entropy``)."""

MIN_VARIABLE_BPTT = 5
"""Shortest window drawn with ``variable_bptt`` (as in AWD-LSTM)."""


class Batch(TypedDict):
    """One item of every DataModule here."""

    inputs: torch.Tensor
    targets: torch.Tensor
    reset: bool


EpochFn = Callable[[], int | None]
"""Returns the current epoch, or ``None`` when unknown (then a per-``__iter__`` counter is used)."""


def window_lengths(
    steps: int, bptt: int, variable: bool = False, generator: torch.Generator | None = None
) -> list[int]:
    """Lengths of the consecutive BPTT windows covering ``steps`` predicted positions.

    Fixed: ``bptt`` each, the last one shorter. Variable (AWD-LSTM): each window's base length is ``bptt``
    with probability 0.95 else ``bptt / 2``; its length is ``int(N(base, 5))`` clipped to at least
    :data:`MIN_VARIABLE_BPTT` (and to the positions left). Draws come from ``generator``.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    lengths: list[int] = []
    pos = 0
    while pos < steps:
        if variable:
            base = bptt if torch.rand((), generator=generator).item() < 0.95 else bptt / 2
            length = max(MIN_VARIABLE_BPTT, int(base + 5.0 * torch.randn((), generator=generator).item()))
        else:
            length = bptt
        length = min(length, steps - pos)
        lengths.append(length)
        pos += length
    return lengths


def _check_single_process_loading() -> None:
    info = get_worker_info()
    if info is not None and info.num_workers > 1:
        raise RuntimeError(
            "These datasets hold their data in memory and are not sharded over DataLoader workers: "
            f"num_workers={info.num_workers} would yield every window {info.num_workers} times. Use num_workers=0."
        )


class _EpochAware:
    """Tracks the epoch: from ``epoch_fn`` (e.g. the trainer's ``current_epoch``) or a per-``__iter__`` counter."""

    def __init__(self, epoch_fn: EpochFn | None) -> None:
        self._epoch_fn = epoch_fn
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used by the next ``__iter__`` (when no ``epoch_fn`` supplies one)."""
        self._next_epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """Epoch the next ``__iter__`` will use."""
        if self._epoch_fn is not None:
            epoch = self._epoch_fn()
            if epoch is not None:
                return int(epoch)
        return self._next_epoch

    def _start_epoch(self) -> int:
        epoch = self.epoch
        self._next_epoch = epoch + 1
        return epoch


class StreamWindowDataset(_EpochAware, IterableDataset):  # type: ignore[type-arg]
    """Consecutive BPTT windows over parallel token streams ``(L, B)``.

    Window ``k`` covers positions ``[p, p+T)``: ``inputs = streams[p:p+T]``, ``targets = streams[p+1:p+1+T]``;
    the next window starts at ``p+T``, so a hidden state can carry over. ``reset`` is ``True`` on the first
    window of each pass. With ``variable_bptt`` the lengths are drawn from a generator seeded with
    ``seed + epoch``: identical on every rank, reproducible across runs, different across epochs.
    """

    def __init__(
        self,
        streams: torch.Tensor,
        bptt: int,
        variable_bptt: bool = False,
        seed: int = 0,
        epoch_fn: EpochFn | None = None,
    ) -> None:
        """``streams``: ``(L, B)`` int64 token ids, one column per stream."""
        super().__init__(epoch_fn)
        if streams.dim() != 2:
            raise ValueError(f"streams must be (L, B), got shape {tuple(streams.shape)}")
        if streams.size(0) < 2:
            raise ValueError(
                f"each stream needs at least 2 tokens for one (input, target) pair, got {streams.size(0)}: "
                "the split is too small for this batch size"
            )
        if bptt < 1:
            raise ValueError(f"bptt must be >= 1, got {bptt}")
        self.streams = streams.long()
        self.bptt = int(bptt)
        self.variable_bptt = bool(variable_bptt)
        self.seed = int(seed)

    @property
    def steps(self) -> int:
        """Predicted positions per stream per epoch (``L - 1``)."""
        return self.streams.size(0) - 1

    def lengths(self, epoch: int | None = None) -> list[int]:
        """Window lengths of ``epoch`` (default: the epoch the next ``__iter__`` will use)."""
        epoch = self.epoch if epoch is None else epoch
        generator = None
        if self.variable_bptt:
            generator = torch.Generator().manual_seed(self.seed + epoch)
        return window_lengths(self.steps, self.bptt, self.variable_bptt, generator)

    def __len__(self) -> int:
        """Number of windows (only defined for fixed ``bptt``; variable lengths vary by epoch)."""
        if self.variable_bptt:
            raise TypeError("the number of windows varies by epoch with variable_bptt=True")
        return -(-self.steps // self.bptt)

    def __iter__(self) -> Iterator[Batch]:
        """Yield the windows of one pass (one epoch)."""
        _check_single_process_loading()
        lengths = self.lengths(self._start_epoch())
        pos = 0
        for k, length in enumerate(lengths):
            yield {
                "inputs": self.streams[pos : pos + length].clone(),
                "targets": self.streams[pos + 1 : pos + 1 + length].clone(),
                "reset": k == 0,
            }
            pos += length


class IndependentBatchDataset(_EpochAware, IterableDataset):  # type: ignore[type-arg]
    """Independent fixed-length batches (``reset=True`` on every item), e.g. synthetic tasks.

    ``make_epoch(epoch)`` returns ``(inputs, targets)`` of shape ``(N, T, B_global)``; this dataset yields the
    columns ``[lo, hi)`` of each of the ``N`` batches (a rank's shard).
    """

    def __init__(
        self,
        make_epoch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        num_batches: int,
        columns: tuple[int, int],
        epoch_fn: EpochFn | None = None,
    ) -> None:
        """See the class docstring; ``num_batches`` is ``N`` (for ``len``)."""
        super().__init__(epoch_fn)
        self.make_epoch = make_epoch
        self.num_batches = int(num_batches)
        self.columns = columns

    def __len__(self) -> int:
        """Number of batches per epoch."""
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        """Yield this rank's slice of each batch of one epoch."""
        _check_single_process_loading()
        inputs, targets = self.make_epoch(self._start_epoch())
        lo, hi = self.columns
        for k in range(inputs.size(0)):
            yield {
                "inputs": inputs[k, :, lo:hi].contiguous(),
                "targets": targets[k, :, lo:hi].contiguous(),
                "reset": True,
            }
