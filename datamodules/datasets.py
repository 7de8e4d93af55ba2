"""Iterable datasets yielding the shared batch contract.

Every item is a dict ``{"inputs": LongTensor (T, B), "targets": LongTensor (T, B), "reset": bool}``
(time-major). Targets equal to :data:`IGNORE_INDEX` are to be ignored by the loss. The datasets are
:class:`~torch.utils.data.IterableDataset` so that Lightning never injects a ``DistributedSampler``: each
rank's dataset already holds only that rank's columns. Use them with ``DataLoader(ds, batch_size=None)``
and ``num_workers=0`` (the data is a small in-memory tensor; several workers would each yield everything).

Mid-epoch resume: a pass over a dataset is a pure function of its epoch (variable BPTT lengths and generated
batches are drawn from generators seeded with the epoch), so the position ``(epoch, windows consumed)`` is the
whole iteration state. :class:`ResumableLoader` hands it to Lightning, which stores it in checkpoints and gives
it back on resume; the next pass of that epoch then starts at the first window not yet trained on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, TypedDict, cast

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

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


class _EpochAware(ABC):
    """Tracks the epoch (from ``epoch_fn``, e.g. the trainer's ``current_epoch``, or a per-``__iter__``
    counter) and the position within the current pass, which :meth:`state_dict` / :meth:`load_state_dict`
    save and restore so that a pass can resume mid-epoch. Subclasses define :meth:`_num_windows` and
    :meth:`_fingerprint` and start every ``__iter__`` with :meth:`_begin_pass`."""

    def __init__(self, epoch_fn: EpochFn | None) -> None:
        self._epoch_fn = epoch_fn
        self._next_epoch = 0
        self._pass_epoch: int | None = None
        self._yielded = 0
        self._resume_at: tuple[int, int] | None = None

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

    def _begin_pass(self) -> tuple[int, int]:
        """Start a pass: its epoch, and how many leading windows to skip (a restored position).

        A restored position applies to a pass of its epoch or of an earlier one: Lightning may still report
        the epoch in which a checkpoint was saved after the last window (then the position is the start of
        the next epoch); a later epoch means the position is stale and is ignored.
        """
        epoch = self._start_epoch()
        skip = 0
        if self._resume_at is not None and epoch <= self._resume_at[0]:
            epoch, skip = self._resume_at
            self._next_epoch = epoch + 1
        self._resume_at = None
        self._pass_epoch, self._yielded = epoch, skip
        return epoch, skip

    @abstractmethod
    def _num_windows(self, epoch: int) -> int:
        """Windows of one pass of ``epoch`` on this rank."""

    @abstractmethod
    def _fingerprint(self) -> dict[str, Any]:
        """The settings that place the windows (identical on every rank), checked when a position is restored."""

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """The position in the current pass: its epoch and how many windows the consumer has taken.

        ``consumed``: windows the consumer has actually used, when it reads ahead (Lightning prefetches one);
        default: every window yielded so far. Also records the settings that define the window boundaries
        (identical on every DDP rank), so that :meth:`load_state_dict` refuses a position that would mean
        different windows.
        """
        epoch = self._pass_epoch if self._pass_epoch is not None else self.epoch
        windows = self._yielded if consumed is None else min(int(consumed), self._yielded)
        finished = windows >= self._num_windows(epoch)
        return {"epoch": epoch, "windows": windows, "finished": finished, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue from ``state``: in ``state["epoch"]`` after the ``state["windows"]``
        windows already used, or at the start of the next epoch if that pass was finished.

        Raises:
            ValueError: the position is mid-epoch but was saved with other data or window settings.
        """
        if state.get("finished", False):
            self._resume_at = (int(state["epoch"]) + 1, 0)
            return
        saved = {key: state.get(key) for key in self._fingerprint()}
        if saved != self._fingerprint():
            differ = {
                key: (value, self._fingerprint()[key])
                for key, value in saved.items()
                if value != self._fingerprint()[key]
            }
            raise ValueError(
                f"Cannot resume {type(self).__name__} mid-epoch (epoch {state.get('epoch')}, window "
                f"{state.get('windows')}): the checkpoint's data differs from this one in "
                + ", ".join(f"{key} (checkpoint {old!r}, now {new!r})" for key, (old, new) in differ.items())
                + ". Resume with the same data, batch size, bptt, variable_bptt and seed as the interrupted run, "
                "or from an end-of-epoch checkpoint."
            )
        self._resume_at = (int(state["epoch"]), int(state["windows"]))


class StreamWindowDataset(_EpochAware, IterableDataset[Batch]):
    """Consecutive BPTT windows over parallel token streams ``(L, B)``.

    Window ``k`` covers positions ``[p, p+T)``: ``inputs = streams[p:p+T]``, ``targets = streams[p+1:p+1+T]``;
    the next window starts at ``p+T``, so a hidden state can carry over. ``reset`` is ``True`` on the first
    window of each pass. With ``variable_bptt`` the lengths are drawn from a generator seeded with
    ``seed + epoch``: identical on every rank, reproducible across runs, different across epochs.

    Args:
        streams: ``(L, B)`` int64 token ids, one column per stream (:func:`~.corpus.batchify` cuts them).
        bptt: window length (with ``variable_bptt``: the base length drawn 95% of the time).
        variable_bptt: draw each window's length as AWD-LSTM does (:func:`window_lengths`).
        seed: seeds the variable lengths (with the epoch).
        epoch_fn: the current epoch (e.g. the trainer's); default: a counter of passes.

    Example::

        >>> streams = torch.arange(20).view(2, 10).t()  # two streams 0..9 and 10..19, time-major (10, 2)
        >>> ds = StreamWindowDataset(streams, bptt=4)
        >>> [(tuple(w["inputs"].shape), w["reset"]) for w in ds]  # 9 predicted positions: 4 + 4 + 1
        [((4, 2), True), ((4, 2), False), ((1, 2), False)]
        >>> window = next(iter(ds))
        >>> window["inputs"][:, 0].tolist(), window["targets"][:, 0].tolist()  # targets: the next tokens
        ([0, 1, 2, 3], [1, 2, 3, 4])
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
        self.streams = streams.long().contiguous()
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

    def _num_windows(self, epoch: int) -> int:
        return len(self.lengths(epoch)) if self.variable_bptt else len(self)

    def _fingerprint(self) -> dict[str, Any]:
        # what the window boundaries depend on; the same on every DDP rank (only rank 0's state is saved)
        return {"steps": self.steps, "bptt": self.bptt, "variable_bptt": self.variable_bptt, "seed": self.seed}

    def __iter__(self) -> Iterator[Batch]:
        """Yield the windows of one pass (one epoch), from a restored position if one was loaded."""
        _check_single_process_loading()
        epoch, skip = self._begin_pass()
        lengths = self.lengths(epoch)
        pos = sum(lengths[:skip])
        for k in range(skip, len(lengths)):
            length = lengths[k]
            self._yielded = k + 1
            yield {
                "inputs": self.streams[pos : pos + length].clone(),
                "targets": self.streams[pos + 1 : pos + 1 + length].clone(),
                "reset": k == 0,
            }
            pos += length


class IndependentBatchDataset(_EpochAware, IterableDataset[Batch]):
    """Independent fixed-length batches (``reset=True`` on every item), e.g. synthetic tasks.

    ``make_epoch(epoch)`` returns ``(inputs, targets)`` of shape ``(N, T, B_global)``; this dataset yields the
    columns ``[lo, hi)`` of each of the ``N`` batches (a rank's shard).

    Args:
        make_epoch: ``epoch -> (inputs, targets)``, each ``(N, T, B_global)``; a pure function of the epoch
            (resume regenerates the epoch and skips the batches already used).
        num_batches: ``N``.
        columns: ``(lo, hi)``, this rank's columns of every batch.
        epoch_fn: the current epoch (e.g. the trainer's); default: a counter of passes.

    Example::

        >>> def make_epoch(epoch):  # 3 batches of 5 steps, 4 columns over all ranks
        ...     inputs = torch.full((3, 5, 4), epoch)
        ...     return inputs, inputs + 1
        >>> ds = IndependentBatchDataset(make_epoch, num_batches=3, columns=(2, 4))  # rank 1 of 2
        >>> [tuple(b["inputs"].shape) for b in ds]
        [(5, 2), (5, 2), (5, 2)]
        >>> next(iter(ds))["inputs"].unique().tolist()  # the second pass is epoch 1
        [1]
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

    def _num_windows(self, epoch: int) -> int:
        return self.num_batches

    def _fingerprint(self) -> dict[str, Any]:
        return {"num_batches": self.num_batches}

    def __iter__(self) -> Iterator[Batch]:
        """Yield this rank's slice of each batch of one epoch, from a restored position if one was loaded."""
        _check_single_process_loading()
        epoch, skip = self._begin_pass()
        inputs, targets = self.make_epoch(epoch)
        lo, hi = self.columns
        for k in range(skip, inputs.size(0)):
            self._yielded = k + 1
            yield {
                "inputs": inputs[k, :, lo:hi].contiguous(),
                "targets": targets[k, :, lo:hi].contiguous(),
                "reset": True,
            }


ResumableDataset = StreamWindowDataset | IndependentBatchDataset


class ResumableLoader(DataLoader[Batch]):
    """``DataLoader(dataset, batch_size=None)`` whose position Lightning saves in checkpoints and restores.

    Lightning's fit loop calls :meth:`state_dict` of every training loader that has one when it saves a
    checkpoint, and :meth:`load_state_dict` before the first ``iter()`` on resume (and then no longer warns
    that the loader cannot resume mid-epoch). The loader reads one window ahead of training (Lightning
    prefetches), so the position saved is ``consumed_fn()`` (windows training has taken) when given.

    Args:
        dataset: a :class:`StreamWindowDataset` or :class:`IndependentBatchDataset`.
        consumed_fn: windows of the current pass the consumer has used (``None``: every window yielded).

    Example::

        >>> streams = torch.arange(40).view(4, 10).t()  # (10, 4): 9 positions, windows at 0, 3 and 6
        >>> loader = ResumableLoader(StreamWindowDataset(streams, bptt=3))
        >>> windows = iter(loader)
        >>> _ = next(windows), next(windows)
        >>> state = loader.state_dict()  # what Lightning puts in a checkpoint
        >>> state["epoch"], state["windows"], state["finished"]
        (0, 2, False)
        >>> resumed = ResumableLoader(StreamWindowDataset(streams, bptt=3))  # a restarted run
        >>> resumed.load_state_dict(state)
        >>> [w["inputs"][0, 0].item() for w in resumed]  # continues with the third window
        [6]
    """

    def __init__(self, dataset: ResumableDataset, consumed_fn: Callable[[], int | None] | None = None) -> None:
        """``consumed_fn``: windows of the current pass the consumer has used (``None``: unknown)."""
        super().__init__(dataset, batch_size=None)
        self.consumed_fn = consumed_fn

    def state_dict(self) -> dict[str, Any]:
        """The dataset's position (see :meth:`StreamWindowDataset.state_dict`)."""
        consumed = self.consumed_fn() if self.consumed_fn is not None else None
        return cast(ResumableDataset, self.dataset).state_dict(consumed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the dataset's next pass at the saved position."""
        cast(ResumableDataset, self.dataset).load_state_dict(state_dict)


def training_batches_taken(trainer: Any | None) -> int | None:
    """Batches the fit loop of ``trainer`` has taken from its training loader in the current epoch.

    Lightning counts a batch as *ready* once the training loop has fetched it for a step; its prefetcher has
    by then read one more from the loader, which is why the loader's own count cannot serve as the position.
    ``None`` without a trainer (or one without a fit loop).
    """
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "batch_progress", None)
    return None if progress is None else int(progress.current.ready)
