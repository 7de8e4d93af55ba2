"""Base DataModule for language modelling on token streams, with DDP-correct sharding.

A split's token stream is cut into ``batch_size`` contiguous streams (the *global* batch; the remainder is
dropped); rank ``r`` of ``W`` owns streams ``[r*B/W, (r+1)*B/W)``. Every rank therefore has the same
stream length and the same windows, and no token is seen twice per epoch.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from .corpus import Vocabulary, batchify
from .datasets import ResumableLoader, StreamWindowDataset, training_batches_taken
from .distributed import check_divisible, rank_and_world_size, shard_range

SPLITS = ("train", "valid", "test")

_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    None: SPLITS,
    "fit": ("train", "valid"),
    "validate": ("valid",),
    "test": ("test",),
    "predict": ("test",),
}


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class TokenStreamDataModule(pl.LightningDataModule, metaclass=ABCMeta):
    """Shared machinery: batching, BPTT windows, sharding and the three dataloaders.

    Subclasses implement :meth:`load_splits`, which sets :attr:`vocab` and returns the 1-D id tensors of the
    requested splits. Items follow the batch contract of :mod:`.datasets`; ``reset`` is ``True`` on the
    first window of every pass over a split.

    Args:
        batch_size: training streams over all ranks (divisible by the world size).
        eval_batch_size: validation/test streams over all ranks.
        bptt: window length (validation and test always use it fixed).
        variable_bptt: AWD-LSTM's random window lengths on the training split.
        seed: seeds the variable lengths (with the epoch).

    Example::

        >>> class Digits(TokenStreamDataModule):  # every split: the digits 0..9 over and over
        ...     def load_splits(self, splits):
        ...         self.vocab = Vocabulary(str(i) for i in range(10))
        ...         return {split: torch.arange(101) % 10 for split in splits}
        >>> dm = Digits(batch_size=4, eval_batch_size=2, bptt=5)
        >>> dm.setup("fit")  # no Trainer: rank 0 of 1
        >>> dm.vocab_size, dm.streams("train").shape  # 101 tokens cut into 4 streams of 25
        (10, torch.Size([25, 4]))
        >>> window = next(iter(dm.train_dataloader()))
        >>> window["inputs"].shape, window["reset"]
        (torch.Size([5, 4]), True)
    """

    def __init__(
        self,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        bptt: int = 70,
        variable_bptt: bool = False,
        seed: int = 0,
    ) -> None:
        """``batch_size``/``eval_batch_size`` are global (over all ranks); validation/test use fixed ``bptt``."""
        super().__init__()
        self.batch_size = _positive_int("batch_size", batch_size)
        self.eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
        self.bptt = _positive_int("bptt", bptt)
        self.variable_bptt = bool(variable_bptt)
        self.seed = int(seed)
        self.vocab: Vocabulary | None = None
        self._ids: dict[str, torch.Tensor] = {}
        self.rank = 0
        self.world_size = 1

    # ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def load_splits(self, splits: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Set :attr:`vocab` and return ``{split: 1-D int64 ids}`` for ``splits`` (a subset of :data:`SPLITS`)."""

    # ----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids (the output layer's width)."""
        if self.vocab is None:
            raise RuntimeError(f"{type(self).__name__}.vocab_size is known after setup(); call setup() first")
        return len(self.vocab)

    @property
    def eos_index(self) -> int | None:
        """Id of ``<eos>`` (``None`` if this corpus has no such token)."""
        if self.vocab is None:
            raise RuntimeError(f"{type(self).__name__}.eos_index is known after setup(); call setup() first")
        return self.vocab.eos_index

    def setup(self, stage: str | None = None) -> None:
        """Read rank/world size, check the global batches divide over it, and load the stage's splits."""
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(s for s in _STAGE_SPLITS if s)}")
        rank, world_size = rank_and_world_size(self.trainer)
        check_divisible(self.batch_size, world_size, "batch_size")
        check_divisible(self.eval_batch_size, world_size, "eval_batch_size")
        self.rank, self.world_size = rank, world_size
        missing = tuple(s for s in _STAGE_SPLITS[stage] if s not in self._ids)
        if missing or self.vocab is None:
            self._ids.update(self.load_splits(missing))

    def token_ids(self, split: str) -> torch.Tensor:
        """The whole 1-D id stream of ``split`` (all ranks' tokens, before batching)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._ids:
            raise RuntimeError(
                f"{type(self).__name__}: the {split!r} split is not loaded; call setup() (or setup('fit') for "
                "train/valid, setup('test') for test) first"
            )
        return self._ids[split]

    def streams(self, split: str) -> torch.Tensor:
        """This rank's ``(L, B/W)`` token matrix for ``split`` (columns are streams)."""
        global_batch = self.batch_size if split == "train" else self.eval_batch_size
        name = "batch_size" if split == "train" else "eval_batch_size"
        lo, hi = shard_range(global_batch, self.rank, self.world_size, name)
        return batchify(self.token_ids(split), global_batch)[:, lo:hi].contiguous()

    def _current_epoch(self) -> int | None:
        return getattr(self.trainer, "current_epoch", None) if self.trainer is not None else None

    def dataset(self, split: str) -> StreamWindowDataset:
        """The iterable dataset behind ``split``'s dataloader (variable BPTT on ``train`` only)."""
        train = split == "train"
        return StreamWindowDataset(
            self.streams(split),
            self.bptt,
            variable_bptt=self.variable_bptt and train,
            seed=self.seed,
            epoch_fn=self._current_epoch if train else None,
        )

    def _loader(self, split: str) -> DataLoader[Any]:
        return DataLoader(self.dataset(split), batch_size=None)

    def _training_windows_taken(self) -> int | None:
        return training_batches_taken(self.trainer)

    def train_dataloader(self) -> ResumableLoader:
        """Training windows (``batch_size/W`` streams, fixed or variable BPTT).

        Resumable: the position in the epoch goes into checkpoints, so a fit resumed from a mid-epoch checkpoint
        continues with the window the interrupted run would have trained on next (same variable-BPTT lengths).
        """
        return ResumableLoader(self.dataset("train"), self._training_windows_taken)

    def val_dataloader(self) -> DataLoader[Any]:
        """Validation windows (``eval_batch_size/W`` streams, fixed BPTT)."""
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader[Any]:
        """Test windows (``eval_batch_size/W`` streams, fixed BPTT)."""
        return self._loader("test")
