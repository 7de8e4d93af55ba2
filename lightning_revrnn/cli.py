"""The ``revrnn`` console script: ``revrnn fit|validate|test --config configs/...yaml`` (LightningCLI).

The model is always :class:`~lightning_revrnn.lm.LanguageModel`; the DataModule is chosen by class path in
the config. ``model.vocab_size`` is linked to the DataModule's vocabulary, so configs never repeat it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_revrnn.lm import LanguageModel


def vocab_size_of(data: pl.LightningDataModule) -> int:
    """The DataModule's vocabulary size (PTB/WikiText-2 build it from the training split in ``setup``)."""
    data.prepare_data()
    data.setup("fit")
    return int(data.vocab_size)  # type: ignore[attr-defined]


class RevRNNCLI(LightningCLI):
    """LightningCLI with ``data`` → ``model.vocab_size`` linked."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.vocab_size", compute_fn=vocab_size_of, apply_on="instantiate")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``revrnn`` console script."""
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
    warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
    RevRNNCLI(
        LanguageModel,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":
    main()
