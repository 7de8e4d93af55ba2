"""The ``revrnn`` console script: ``revrnn fit|validate|test|predict --config configs/...yaml`` (LightningCLI).

Model and DataModule are both chosen by class path in the config (``model.class_path``:
:class:`~lightning_revrnn.lm.LanguageModel` or :class:`~lightning_revrnn.translation.model.TranslationModel`), so one
command trains either; options are set with ``--model.<name>`` / ``--data.<name>`` as before. Both models
read their vocabulary sizes from the DataModule in ``setup()`` (and save them in their hyperparameters),
so configs never repeat them. ``revrnn predict`` with a translation model writes its translations to
``--model.prediction_file``.

``revrnn translate --ckpt_path X --input F --output G`` translates raw sentences with a TranslationModel checkpoint
(no config; :mod:`lightning_revrnn.translation.translate_cli`): it is handled before LightningCLI sees the arguments.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_revrnn.checkpoints import check_checkpoint_file


class RevRNNCLI(LightningCLI):
    """LightningCLI over any LightningModule and DataModule subclass (by class path).

    No argument links: a link to ``model.init_args.vocab_size`` would reach every model class, and for one
    without that argument (TranslationModel) LightningCLI records it in the checkpoint's hyperparameters, which
    ``--ckpt_path`` then fails to parse back. The models read their sizes from the DataModule instead.

    ``--ckpt_path`` is checked to be a checkpoint file at all (:func:`~lightning_revrnn.checkpoints.
    check_checkpoint_file`) right after parsing, before LightningCLI loads its hyperparameters from it."""

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``revrnn`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["translate"]:
        from lightning_revrnn.translation.translate_cli import main as translate

        translate(argv[1:])
        return
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
