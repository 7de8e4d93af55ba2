"""DataModules for language modelling and synthetic memory tasks.

Every DataModule's dataloaders yield dicts ``{"inputs": LongTensor (T, B), "targets": LongTensor (T, B),
"reset": bool}`` (time-major; ``targets`` ignore positions hold -100; ``reset`` marks where a carried hidden
state must be reset). ``batch_size`` arguments are global over all DDP ranks.
"""

from .corpus import EOS, Vocabulary, batchify, read_tokens, tokenize
from .datasets import IGNORE_INDEX, Batch, IndependentBatchDataset, StreamWindowDataset, window_lengths
from .download import DATA_DIR_ENV, ArchiveMirror, CorpusSpec, FileMirror, default_data_dir, ensure_files
from .errors import ChecksumMismatchError, CorpusFormatError, DataError, MissingDataError, UnknownTokenError
from .streams import TokenStreamDataModule
from .synthetic import MarkovSource, SyntheticLMDataModule, markov_entropy_rate
from .tasks import CopyTasksDataModule
from .text import PTB_SPEC, WIKITEXT2_SPEC, PTBDataModule, TextCorpusDataModule, WikiText2DataModule

__all__ = [
    "DATA_DIR_ENV",
    "EOS",
    "IGNORE_INDEX",
    "PTB_SPEC",
    "WIKITEXT2_SPEC",
    "ArchiveMirror",
    "Batch",
    "ChecksumMismatchError",
    "CopyTasksDataModule",
    "CorpusFormatError",
    "CorpusSpec",
    "DataError",
    "FileMirror",
    "IndependentBatchDataset",
    "MarkovSource",
    "MissingDataError",
    "PTBDataModule",
    "StreamWindowDataset",
    "SyntheticLMDataModule",
    "TextCorpusDataModule",
    "TokenStreamDataModule",
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
