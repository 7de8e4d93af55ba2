"""Which sentence pairs go into which batch (bucketing), the rank's share of it, and the loaders.

Training (:func:`training_plan`): every epoch the pairs are shuffled with a generator seeded from ``seed`` and
the epoch, cut into pools of :data:`POOL_BATCHES` batches, sorted by length within each pool and cut into
global batches of exactly ``batch_size`` pairs, whose order is then shuffled again. Pairs in a batch thus have
similar lengths (little padding) while the batches and their order change every epoch. The ``N mod
batch_size`` pairs left over (different ones each epoch) are not used in that epoch.

Evaluation (:func:`evaluation_plan`): fixed batches, sorted by length (or in file order for prediction), of
near-equal sizes, every pair exactly once (no duplicates, which would bias BLEU).

DDP: every global batch is split into ``world_size`` contiguous slices of its rows (:func:`rank_rows`), so each
rank gets distinct pairs, ``batch_size / world_size`` of them per training batch, and the same number of
batches. The datasets are :class:`~torch.utils.data.IterableDataset` so that Lightning injects no sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .datasets import EpochFn, _EpochAware
from .parallel import EncodedPairs, TranslationBatch, collate

POOL_BATCHES = 100
"""Batches per sorting pool in :func:`training_plan` (larger: closer lengths, less randomness)."""

Plan = list[Tensor]
"""Global batches of one pass, each a 1-D tensor of pair indices."""


def _by_length(src_len: Tensor, tgt_len: Tensor, candidates: Tensor) -> Tensor:
    """``candidates`` sorted by (source length, target length), stably."""
    key = src_len[candidates] * (int(tgt_len.max()) + 1) + tgt_len[candidates]
    return candidates[torch.sort(key, stable=True).indices]


def training_plan(
    src_len: Tensor, tgt_len: Tensor, batch_size: int, generator: torch.Generator, pool_batches: int = POOL_BATCHES
) -> Plan:
    """One epoch's global training batches of exactly ``batch_size`` pairs (see the module docstring)."""
    n = int(src_len.numel())
    if n < batch_size:
        raise ValueError(
            f"the training split has {n} pairs, fewer than one batch of batch_size={batch_size}; "
            "use a smaller batch_size"
        )
    order = torch.randperm(n, generator=generator)[: n - n % batch_size]
    pool = batch_size * pool_batches
    batches: Plan = []
    for start in range(0, order.numel(), pool):
        batches.extend(_by_length(src_len, tgt_len, order[start : start + pool]).split(batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def evaluation_plan(
    src_len: Tensor, tgt_len: Tensor, batch_size: int, world_size: int = 1, by_length: bool = True
) -> Plan:
    """Fixed global batches covering every pair once: ``ceil(N / batch_size)`` batches of near-equal size
    (sizes differ by at most one), in length order (``by_length``) or file order.

    Each batch holds at least ``world_size`` pairs so that no rank gets an empty one (with ``batch_size ==
    world_size`` that may take fewer, slightly larger batches).
    """
    n = int(src_len.numel())
    if n < world_size:
        raise ValueError(f"an evaluation split of {n} pairs cannot give each of {world_size} ranks a sentence")
    order = _by_length(src_len, tgt_len, torch.arange(n)) if by_length else torch.arange(n)
    count = min(-(-n // batch_size), n // world_size)
    return [order[k * n // count : (k + 1) * n // count] for k in range(count)]


def rank_rows(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous share ``[r*m/W, (r+1)*m/W)`` of a global batch of ``m`` pair indices."""
    m = batch.numel()
    return batch[rank * m // world_size : (rank + 1) * m // world_size]


class TranslationBatchDataset(_EpochAware, IterableDataset[TranslationBatch]):
    """This rank's :class:`TranslationBatch` es of one pass over a split, following ``plan_fn(epoch)``.

    A pass is a pure function of its epoch, so its position (epoch, batches used) is its whole state: the
    training loader saves it in checkpoints and a resumed run continues with the next batch (see
    :mod:`.datasets`). With DataLoader workers, worker ``w`` of ``K`` yields batches ``w, w+K, ...`` of the pass;
    the DataLoader hands them out in order, so the sequence is the same as with ``num_workers=0``.
    """

    def __init__(
        self,
        pairs: EncodedPairs,
        plan_fn: Callable[[int], Plan],
        num_batches: int,
        rank: int,
        world_size: int,
        fingerprint: dict[str, Any],
        epoch_fn: EpochFn | None = None,
    ) -> None:
        """``num_batches``: ``len(plan_fn(e))`` for every epoch ``e``; ``fingerprint``: the settings that place the
        batches (checked when a saved position is restored)."""
        super().__init__(epoch_fn)
        self.pairs = pairs
        self.plan_fn = plan_fn
        self.num_batches = int(num_batches)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.fingerprint = dict(fingerprint)
        self._planned: tuple[int, int] | None = None

    def __len__(self) -> int:
        """Batches per pass on this rank (equal on every rank)."""
        return self.num_batches

    def _num_windows(self, epoch: int) -> int:
        return self.num_batches

    def _fingerprint(self) -> dict[str, Any]:
        return dict(self.fingerprint)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable copy for spawned workers: without ``epoch_fn`` (the pass is planned before they start)."""
        state = dict(self.__dict__)
        state["_epoch_fn"] = None
        return state

    def begin_pass(self) -> None:
        """Fix the next pass's (epoch, batches to skip) in this process, before any worker copies the dataset."""
        self._planned = self._begin_pass()

    def __iter__(self) -> Iterator[TranslationBatch]:
        """This rank's batches of one pass (this worker's share of them, with workers)."""
        epoch, skip = self._planned if self._planned is not None else self._begin_pass()
        self._planned = None
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.plan_fn(epoch)
        for k in range(skip + worker, len(plan), workers):
            yield collate(self.pairs, rank_rows(plan[k], self.rank, self.world_size))


class TranslationTrainLoader(DataLoader[TranslationBatch]):
    """The training loader: counts the batches it hands out and saves/restores the position in checkpoints
    (like :class:`~.datasets.ResumableLoader`), with or without workers."""

    def __init__(
        self,
        dataset: TranslationBatchDataset,
        num_workers: int = 0,
        consumed_fn: Callable[[], int | None] | None = None,
    ) -> None:
        """``consumed_fn``: batches of the current pass training has used (Lightning reads one ahead)."""
        super().__init__(dataset, batch_size=None, num_workers=num_workers)
        self.consumed_fn = consumed_fn

    def __iter__(self) -> Iterator[TranslationBatch]:  # type: ignore[override]
        """Plan the pass here (so the epoch comes from this process), then count each batch handed out."""
        dataset = cast(TranslationBatchDataset, self.dataset)
        dataset.begin_pass()
        return self._counted(super().__iter__(), dataset)

    @staticmethod
    def _counted(batches: Iterator[Any], dataset: TranslationBatchDataset) -> Iterator[TranslationBatch]:
        for batch in batches:
            dataset._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position in the pass (see :meth:`~.datasets._EpochAware.state_dict`)."""
        consumed = self.consumed_fn() if self.consumed_fn is not None else None
        return cast(TranslationBatchDataset, self.dataset).state_dict(consumed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the next pass at the saved position."""
        cast(TranslationBatchDataset, self.dataset).load_state_dict(state_dict)
