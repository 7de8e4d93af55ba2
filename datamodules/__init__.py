"""DataModules for language modelling, synthetic memory tasks and translation.

The language-modelling and memory-task DataModules' dataloaders yield dicts ``{"inputs": LongTensor (T, B),
"targets": LongTensor (T, B), "reset": bool}`` (time-major; ``targets`` ignore positions hold -100; ``reset``
marks where a carried hidden state must be reset). ``batch_size`` arguments are global over all DDP ranks.

The translation DataModules (:mod:`.translation`) yield :class:`TranslationBatch` es instead. Note that
``EOS`` here is the language models' ``"<eos>"`` string; the translation special ids are
``translation.PAD/UNK/BOS/EOS`` (exported here as ``PAD``, ``UNK``, ``BOS``, ``TRANSLATION_EOS``).
"""

from .corpus import EOS, Vocabulary, batchify, read_tokens, tokenize
from .datasets import IGNORE_INDEX, Batch, IndependentBatchDataset, StreamWindowDataset, window_lengths
from .download import DATA_DIR_ENV, ArchiveMirror, CorpusSpec, FileMirror, default_data_dir, ensure_files
from .errors import ChecksumMismatchError, CorpusFormatError, DataError, MissingDataError, UnknownTokenError
from .streams import TokenStreamDataModule
from .synthetic import MarkovSource, SyntheticLMDataModule, markov_entropy_rate
from .tasks import CopyTasksDataModule
from .text import PTB_SPEC, WIKITEXT2_SPEC, PTBDataModule, TextCorpusDataModule, WikiText2DataModule
from .translation import (
    BOS,
    IWSLT2016_SPEC,
    MULTI30K_SPEC,
    PAD,
    SPECIALS,
    UNK,
    IWSLT2016DataModule,
    Multi30KDataModule,
    ParallelText,
    SyntheticTranslationDataModule,
    TextPreprocessing,
    TranslationBatch,
    TranslationDataModule,
    TranslationVocabulary,
)
from .translation import EOS as TRANSLATION_EOS

__all__ = [
    "BOS",
    "DATA_DIR_ENV",
    "EOS",
    "IGNORE_INDEX",
    "IWSLT2016_SPEC",
    "MULTI30K_SPEC",
    "PAD",
    "PTB_SPEC",
    "SPECIALS",
    "TRANSLATION_EOS",
    "UNK",
    "WIKITEXT2_SPEC",
    "ArchiveMirror",
    "Batch",
    "ChecksumMismatchError",
    "CopyTasksDataModule",
    "CorpusFormatError",
    "CorpusSpec",
    "DataError",
    "FileMirror",
    "IWSLT2016DataModule",
    "IndependentBatchDataset",
    "MarkovSource",
    "MissingDataError",
    "Multi30KDataModule",
    "PTBDataModule",
    "ParallelText",
    "StreamWindowDataset",
    "SyntheticLMDataModule",
    "SyntheticTranslationDataModule",
    "TextCorpusDataModule",
    "TextPreprocessing",
    "TokenStreamDataModule",
    "TranslationBatch",
    "TranslationDataModule",
    "TranslationVocabulary",
    "UnknownTokenError",
    "Vocabulary",
    "WikiText2DataModule",
    "batchify",
    "default_data_dir",
    "ensure_files",
    "markov_entropy_rate",
    "read_tokens",
    "tokenize",
    "window_lengths",
]
