"""The ``revrnn`` console script: ``revrnn fit|validate|test|predict --config configs/...yaml`` (LightningCLI).

Model and DataModule are both chosen by class path in the config (``model.class_path``:
:class:`~lightning_revrnn.lm.LanguageModel` or :class:`~lightning_revrnn.translation.model.TranslationModel`), so one
command trains either; options are set with ``--model.<name>`` / ``--data.<name>`` as before. Both models
read their vocabulary sizes from the DataModule in ``setup()`` (and save them in their hyperparameters),
so configs never repeat them. ``revrnn predict`` with a translation model writes its translations to
``--model.prediction_file``.

``revrnn translate --ckpt_path X --input F --output G`` translates raw sentences with a TranslationModel checkpoint
(no config; :mod:`lightning_revrnn.translation.translate_cli`): it is handled before LightningCLI sees the arguments.
Checkpoints are interchangeable with Python: one written by ``revrnn fit`` loads with
``TranslationModel.load_from_checkpoint`` / ``LanguageModel.load_from_checkpoint``, and one written by a plain
``Trainer`` (``trainer.fit`` or ``trainer.save_checkpoint``) runs with ``revrnn test|predict --ckpt_path``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_revrnn.checkpoints import check_checkpoint_file

#: The package's LightningModules, tried in this order for a checkpoint that does not name its class.
MODEL_CLASS_PATHS = ("lightning_revrnn.translation.TranslationModel", "lightning_revrnn.lm.LanguageModel")


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

    @override
    def _parse_ckpt_path(self) -> None:
        """Put a checkpoint's hyperparameters over the config, as LightningCLI does, also for one saved from Python.

        LightningCLI saves the model's class path with the hyperparameters (``_class_path``) and parses them back
        with it. A checkpoint written by a plain ``Trainer`` has only the ``__init__`` arguments, which LightningCLI
        would parse against the base class ``LightningModule`` and reject ("Option 'rnn' is not accepted ...
        Parsing of ckpt_path hyperparameters failed!"). Such a checkpoint gets the class of the config's model
        when that accepts every saved argument, else the first of this package's models that does."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = dict(ckpt.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None) or self._class_accepting(hparams)
        model = {"class_path": class_path, "dict_kwargs": hparams} if class_path else hparams
        try:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def _class_accepting(self, hparams: dict[str, Any]) -> str | None:
        """The class path of the config's model if its ``__init__`` takes every key of ``hparams``, else of the
        first of :data:`MODEL_CLASS_PATHS` that does; None when none does."""
        configured = self.config[self.config.subcommand].get("model")
        first = getattr(configured, "class_path", None) if configured is not None else None
        paths: list[str] = ([str(first)] if first else []) + list(MODEL_CLASS_PATHS)
        for path in paths:
            module, _, name = path.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
            params = inspect.signature(cls.__init__).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            if takes_any or set(hparams) <= set(params):
                return path
        return None


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
