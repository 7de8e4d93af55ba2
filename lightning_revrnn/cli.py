"""The ``revrnn`` console script: ``revrnn fit|validate|test|predict --config configs/...yaml`` (LightningCLI).

Model and DataModule are both chosen by class path in the config (``model.class_path``:
:class:`~lightning_revrnn.lm.LanguageModel` or :class:`~lightning_revrnn.seq2seq.TranslationModel`), so one
command trains either; options are set with ``--model.<name>`` / ``--data.<name>`` as before. A language
model's ``vocab_size`` is linked to the DataModule's vocabulary, so configs never repeat it; a translation
model reads its vocabularies from the DataModule in ``setup()``. ``revrnn predict`` with a translation
model writes its translations to ``--model.prediction_file``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override


def vocab_size_of(data: pl.LightningDataModule) -> int | None:
    """A language-model DataModule's vocabulary size (PTB/WikiText-2 build it from the training split in
    ``setup``); None for DataModules without one (translation: two vocabularies, read by the model)."""
    if "vocab_size" not in dir(data):
        return None
    data.prepare_data()
    data.setup("fit")
    return int(data.vocab_size)  # type: ignore[attr-defined]


class RevRNNCLI(LightningCLI):
    """LightningCLI with ``data`` → ``model.init_args.vocab_size`` linked (applied to models that take it)."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=vocab_size_of, apply_on="instantiate")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``revrnn`` console script."""
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
    warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
    RevRNNCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":
    main()
