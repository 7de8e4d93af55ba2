"""Synthetic memory tasks in the style of the paper's Section 4 (no download).

- ``"repeat"``: random tokens; the target at step ``t`` is the input at step ``t-1`` (step 0 has no target).
- ``"remember"``: random tokens; only the last step has a target, the *first* input token.

Positions without a target hold :data:`~.datasets.IGNORE_INDEX` (-100). Every batch is an independent
sequence, so ``reset`` is ``True`` on every item. Training data is regenerated every epoch (from ``seed`` and
the epoch); validation and test data are fixed.
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from .corpus import Vocabulary
from .datasets import IGNORE_INDEX, IndependentBatchDataset, ResumableLoader, training_batches_taken
from .distributed import rank_and_world_size, shard_range
from .seeding import generator

Task = Literal["repeat", "remember"]
TASKS: tuple[str, ...] = ("repeat", "remember")


def make_task_batches(
    task: str, num_batches: int, seq_len: int, batch_size: int, vocab_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of shape ``(num_batches, seq_len, batch_size)`` for ``task`` (time-major batches)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    inputs = torch.randint(vocab_size, (num_batches, seq_len, batch_size), generator=gen)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    if task == "repeat":
        targets[:, 1:] = inputs[:, :-1]
    else:
        targets[:, -1] = inputs[:, 0]
    return inputs, targets


class CopyTasksDataModule(pl.LightningDataModule):
    """The ``repeat`` / ``remember`` tasks with the shared batch contract (``reset=True`` on every item).

    ``batch_size`` is global and must be divisible by the world size; each rank gets its columns of the same
    generated batches. The vocabulary is ``["0", ..., "V-1"]`` (no ``<eos>``).

    Args:
        task: ``"repeat"`` or ``"remember"`` (module docstring).
        vocab_size: tokens ``V``.
        seq_len: steps per sequence.
        batch_size: sequences per batch over all ranks.
        train_batches: batches per training epoch (regenerated each epoch).
        val_batches: batches of the fixed validation split (and of the test split).
        seed: seeds every split (training: with the epoch).

    Example::

        >>> dm = CopyTasksDataModule(task="remember", vocab_size=8, seq_len=6, batch_size=4, train_batches=3)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["inputs"].shape, len(dm.train_dataloader())
        (torch.Size([6, 4]), 3)
        >>> torch.equal(batch["targets"][-1], batch["inputs"][0])  # the last step recalls the first token
        True
        >>> (batch["targets"][:-1] == IGNORE_INDEX).all().item()  # no target elsewhere
        True
    """

    def __init__(
        self,
        task: Task = "repeat",
        vocab_size: int = 16,
        seq_len: int = 20,
        batch_size: int = 32,
        train_batches: int = 200,
        val_batches: int = 20,
        seed: int = 0,
    ) -> None:
        """``train_batches``/``val_batches``: batches per epoch (test uses ``val_batches`` fresh batches)."""
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        for name, value, low in (
            ("vocab_size", vocab_size, 2),
            ("seq_len", seq_len, 2),
            ("batch_size", batch_size, 1),
            ("train_batches", train_batches, 1),
            ("val_batches", val_batches, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.save_hyperparameters()
        self.task: str = task
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.seed = int(seed)
        self.vocab = Vocabulary(str(i) for i in range(vocab_size))
        self.rank = 0
        self.world_size = 1

    @property
    def eos_index(self) -> int | None:
        """Always ``None``: these tasks have no end-of-sentence token."""
        return None

    def setup(self, stage: str | None = None) -> None:
        """Read rank/world size and check that ``batch_size`` divides over it."""
        self.rank, self.world_size = rank_and_world_size(self.trainer)
        shard_range(self.batch_size, self.rank, self.world_size, "batch_size")

    def _generate(self, split: str, num_batches: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = generator(self.seed, self.task, split, epoch)
        return make_task_batches(self.task, num_batches, self.seq_len, self.batch_size, self.vocab_size, gen)

    def _current_epoch(self) -> int | None:
        return getattr(self.trainer, "current_epoch", None) if self.trainer is not None else None

    def dataset(self, split: str) -> IndependentBatchDataset:
        """This rank's dataset for ``split`` (``train``: new data each epoch; ``valid``/``test``: fixed)."""
        columns = shard_range(self.batch_size, self.rank, self.world_size, "batch_size")
        if split == "train":
            return IndependentBatchDataset(
                lambda epoch: self._generate("train", self.train_batches, epoch),
                self.train_batches,
                columns,
                epoch_fn=self._current_epoch,
            )
        if split in ("valid", "test"):
            return IndependentBatchDataset(
                lambda epoch: self._generate(split, self.val_batches, 0), self.val_batches, columns
            )
        raise ValueError(f"unknown split {split!r}; expected 'train', 'valid' or 'test'")

    def train_dataloader(self) -> ResumableLoader:
        """Training batches (regenerated each epoch); resumable mid-epoch from a checkpoint."""
        return ResumableLoader(self.dataset("train"), self._training_batches_taken)

    def _training_batches_taken(self) -> int | None:
        return training_batches_taken(self.trainer)

    def val_dataloader(self) -> DataLoader[Any]:
        """Fixed validation batches."""
        return DataLoader(self.dataset("valid"), batch_size=None)

    def test_dataloader(self) -> DataLoader[Any]:
        """Fixed test batches (independent of the validation ones)."""
        return DataLoader(self.dataset("test"), batch_size=None)
