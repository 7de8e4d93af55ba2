"""Translation DataModules (sentence pairs, English→German): the public names in one place.

- :class:`Multi30KDataModule` (:mod:`.multi30k`), :class:`IWSLT2016DataModule` (:mod:`.iwslt`),
  :class:`SyntheticTranslationDataModule` (:mod:`.synthetic_translation`), all built on
  :class:`TranslationDataModule` (:mod:`.translation_datamodule`: vocabularies, length filter, loaders);
- their batches, :class:`TranslationBatch` (:mod:`.parallel`), bucketed as :mod:`.bucketing` describes;
- :class:`TextPreprocessing`, how each corpus's raw sentences became its tokens (:mod:`.preprocessing`);
- :class:`TranslationVocabulary` and the special ids :data:`PAD`, :data:`UNK`, :data:`BOS`, :data:`EOS`
  (:data:`SPECIALS`), the same in every vocabulary (:mod:`.vocabulary`).
"""

from __future__ import annotations

from .iwslt import IWSLT2016_SPEC, IWSLT2016DataModule
from .multi30k import MULTI30K_SPEC, Multi30KDataModule
from .parallel import ParallelText, TranslationBatch
from .preprocessing import IWSLT_PREPROCESSING, MULTI30K_PREPROCESSING, WHITESPACE, TextPreprocessing
from .synthetic_translation import SyntheticTranslationDataModule
from .translation_datamodule import TranslationDataModule
from .vocabulary import BOS, EOS, PAD, SPECIALS, UNK, TranslationVocabulary

__all__ = [
    "BOS",
    "EOS",
    "IWSLT2016_SPEC",
    "IWSLT_PREPROCESSING",
    "MULTI30K_PREPROCESSING",
    "MULTI30K_SPEC",
    "PAD",
    "SPECIALS",
    "UNK",
    "WHITESPACE",
    "IWSLT2016DataModule",
    "Multi30KDataModule",
    "ParallelText",
    "SyntheticTranslationDataModule",
    "TextPreprocessing",
    "TranslationBatch",
    "TranslationDataModule",
    "TranslationVocabulary",
]
