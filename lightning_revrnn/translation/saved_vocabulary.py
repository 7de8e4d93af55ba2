"""A translation checkpoint's vocabularies (the tokens, not only sizes) and text preprocessing: saved with the
weights so a loaded model decodes with its own words and translates raw text without its DataModule."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from lightning_revrnn.datamodules.preprocessing import TextPreprocessing
from lightning_revrnn.datamodules.translation import TranslationVocabulary

#: Where a checkpoint keeps them.
SAVED_KEY = "revrnn_vocab"


def save_vocabularies(
    src: TranslationVocabulary, tgt: TranslationVocabulary, tgt_lang: str, preprocessing: TextPreprocessing | None
) -> dict[str, Any]:
    """The checkpoint entry for a model's vocabularies, target language and preprocessing."""
    return {
        "src": src.state_dict(),
        "tgt": tgt.state_dict(),
        "tgt_lang": tgt_lang,
        "preprocessing": None if preprocessing is None else preprocessing.state_dict(),
    }


def load_vocabularies(
    checkpoint: dict[str, Any],
) -> tuple[TranslationVocabulary, TranslationVocabulary, str, TextPreprocessing | None] | None:
    """``(src, tgt, tgt_lang, preprocessing)`` from a checkpoint, or None (with a warning) for a checkpoint
    written before they were saved."""
    saved = checkpoint.get(SAVED_KEY)
    if saved is None:
        rank_zero_warn(
            "This TranslationModel checkpoint does not record its vocabularies (it predates them): "
            "the DataModule's are used unchecked. Make sure it is built as for the training run."
        )
        return None
    prep = saved.get("preprocessing")
    preprocessing = None if prep is None else TextPreprocessing.from_state_dict(prep)
    src, tgt = TranslationVocabulary.from_state_dict(saved["src"]), TranslationVocabulary.from_state_dict(saved["tgt"])
    return src, tgt, saved["tgt_lang"], preprocessing
