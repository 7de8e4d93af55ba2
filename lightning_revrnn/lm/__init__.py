"""Language modelling: the :class:`LanguageModel` LightningModule and its :class:`DecoderHead`."""

from lightning_revrnn.lm.head import DecoderHead
from lightning_revrnn.lm.model import LanguageModel, RnnType

__all__ = ["DecoderHead", "LanguageModel", "RnnType"]
