"""Base DataModule for sentence-pair translation: vocabularies, length filtering, bucketed DDP-sharded loaders.

Subclasses say where the tokenised sentence pairs of each split come from (:meth:`read_split`); this class
builds one vocabulary per language from the training pairs, drops training pairs longer than ``max_len``
tokens on either side (validation and test are never filtered by length), and serves
:class:`~.parallel.TranslationBatch` es: bucketed and reshuffled per epoch for training, fixed and length-sorted
for validation/test, in file order for prediction (the test split). ``batch_size`` is global: each of ``W`` DDP
ranks gets ``batch_size / W`` pairs of every training batch and the same number of batches (see :mod:`.bucketing`).

Empty sentences: a pair whose source or target is empty (or whitespace only) has nothing to encode or attend
to, and one such row turns a batch's loss into NaN. Training drops those pairs with one warning that counts
them; validation and test (also served for predict) refuse them with an error naming the split and the pair
(its line in line-aligned files), unless ``drop_empty_eval_pairs=True`` drops them with a warning that the
split changed size. An evaluation split never changes size silently.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from .bucketing import TranslationBatchDataset, TranslationTrainLoader, evaluation_plan, training_plan
from .datasets import training_batches_taken
from .distributed import check_divisible, rank_and_world_size
from .errors import CorpusFormatError
from .parallel import EncodedPairs, ParallelText
from .preprocessing import WHITESPACE, TextPreprocessing
from .seeding import generator
from .vocabulary import TranslationVocabulary

SPLITS = ("train", "valid", "test")
#: What each split is used for, in messages.
_SPLIT_USES = {"train": "training", "valid": "validation", "test": "test and predict"}
#: Pair numbers listed in a message about empty sentences before "and N more".
_LISTED = 5

_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    None: SPLITS,
    "fit": ("train", "valid"),
    "validate": ("valid",),
    "test": ("test",),
    "predict": ("test",),
}


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class TranslationDataModule(pl.LightningDataModule, metaclass=ABCMeta):
    """Shared machinery of the translation DataModules (see the module docstring).

    After :meth:`setup`: :attr:`src_vocab` / :attr:`tgt_vocab` (built from the length-filtered training pairs)
    and :meth:`pairs` of the loaded splits. The vocabularies also go into checkpoints (:meth:`state_dict`), where
    a restore checks that the data gives the same ones.
    """

    src_lang: str = "en"
    """Source language code."""
    tgt_lang: str = "de"
    """Target language code."""
    text_preprocessing: TextPreprocessing = WHITESPACE
    """How raw sentences became the tokens :meth:`read_split` returns (languages from :attr:`src_lang` /
    :attr:`tgt_lang`); see :attr:`preprocessing`. Subclasses set their corpus's."""

    def __init__(
        self,
        batch_size: int = 64,
        min_freq: int = 1,
        max_vocab: int | None = None,
        max_len: int = 50,
        num_workers: int = 0,
        seed: int = 0,
        drop_empty_eval_pairs: bool = False,
    ) -> None:
        """``min_freq``/``max_vocab``: see :meth:`~.vocabulary.TranslationVocabulary.build` (``max_vocab`` counts the
        specials and applies to each language); ``max_len``: longest training sentence kept, in tokens;
        ``seed``: seeds the per-epoch shuffling (with the epoch); ``drop_empty_eval_pairs``: drop validation/test
        pairs with an empty side (with a warning that the split changed size) instead of raising
        :class:`~.errors.CorpusFormatError` (training always drops them, see the module docstring)."""
        super().__init__()
        self.batch_size = _int_at_least("batch_size", batch_size, 1)
        self.min_freq = _int_at_least("min_freq", min_freq, 1)
        self.max_vocab = None if max_vocab is None else _int_at_least("max_vocab", max_vocab, 4)
        self.max_len = _int_at_least("max_len", max_len, 1)
        self.num_workers = _int_at_least("num_workers", num_workers, 0)
        self.seed = int(seed)
        self.drop_empty_eval_pairs = bool(drop_empty_eval_pairs)
        self.src_vocab: TranslationVocabulary | None = None
        self.tgt_vocab: TranslationVocabulary | None = None
        self.train_pairs_dropped = 0
        """Training pairs dropped by ``max_len`` (known after setup)."""
        self.empty_pairs_dropped: dict[str, int] = {}
        """Pairs dropped per split for an empty source or target (known after setup; absent: none)."""
        self._pairs: dict[str, EncodedPairs] = {}
        self.rank = 0
        self.world_size = 1

    @abstractmethod
    def read_split(self, split: str) -> ParallelText:
        """The tokenised, lower-cased sentence pairs of ``split`` (``train``/``valid``/``test``), unfiltered."""

    # ----------------------------------------------------------------------------------------------------
    @property
    def preprocessing(self) -> TextPreprocessing:
        """How a raw sentence becomes this corpus's tokens and a translation's tokens become text: a
        :class:`~lightning_revrnn.translation.model.TranslationModel` trained here keeps it in its checkpoint and
        prepares new text with it (``translate_text``)."""
        return self.text_preprocessing.with_languages(self.src_lang, self.tgt_lang)

    @property
    def src_vocab_size(self) -> int:
        """Number of source ids (known after :meth:`setup`)."""
        return len(self._vocab("src_vocab"))

    @property
    def tgt_vocab_size(self) -> int:
        """Number of target ids (known after :meth:`setup`)."""
        return len(self._vocab("tgt_vocab"))

    def _vocab(self, name: str) -> TranslationVocabulary:
        vocab: TranslationVocabulary | None = getattr(self, name)
        if vocab is None:
            raise RuntimeError(
                f"{type(self).__name__}.{name} is built from the training split in setup(); call setup() first"
            )
        return vocab

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read rank/world size, check ``batch_size`` divides over it, build the vocabularies (once) and encode
        the stage's splits."""
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(s for s in _STAGE_SPLITS if s)}")
        self.rank, self.world_size = rank_and_world_size(self.trainer)
        check_divisible(self.batch_size, self.world_size, "batch_size")
        if self.src_vocab is None or self.tgt_vocab is None or "train" in _STAGE_SPLITS[stage]:
            self._load_train()
        for split in _STAGE_SPLITS[stage]:
            if split not in self._pairs:
                text = self._read_nonempty(split)
                self._pairs[split] = EncodedPairs.encode(text, self._vocab("src_vocab"), self._vocab("tgt_vocab"))

    def _load_train(self) -> None:
        if "train" in self._pairs:
            return
        full = self._read_nonempty("train")
        train = full.within(self.max_len)
        self.train_pairs_dropped = len(full) - len(train)
        if self.src_vocab is None or self.tgt_vocab is None:
            self.src_vocab = TranslationVocabulary.build(
                (s.split() for s in train.sources), self.min_freq, self.max_vocab
            )
            self.tgt_vocab = TranslationVocabulary.build(
                (t.split() for t in train.targets), self.min_freq, self.max_vocab
            )
        self._pairs["train"] = EncodedPairs.encode(train, self.src_vocab, self.tgt_vocab)

    def _read_nonempty(self, split: str) -> ParallelText:
        """:meth:`read_split` with the pairs that have an empty side dropped (training, or evaluation with
        ``drop_empty_eval_pairs``: with a warning counting them) or refused (evaluation).

        Raises:
            CorpusFormatError: an evaluation split has such a pair, naming the split, the pair and the fix.
        """
        text = self.read_split(split)
        empty = text.empty_pairs()
        if not empty:
            return text
        name, use = type(self).__name__, _SPLIT_USES[split]
        listed = ", ".join(f"{i + 1} ({text.empty_side(i)})" for i in empty[:_LISTED])
        listed += f" and {len(empty) - _LISTED} more" if len(empty) > _LISTED else ""
        where = (
            f"the {split!r} split ({use}) has {len(empty)} of {len(text)} sentence pairs with an empty or "
            f"whitespace-only side, at pair {listed} (numbered from 1: the line in line-aligned files)"
        )
        if split != "train" and not self.drop_empty_eval_pairs:
            raise CorpusFormatError(
                f"{name}: {where}. An empty sentence has nothing to encode or attend to, and an evaluation split "
                "is never shortened silently (its scores would be on other data). Fix: correct or remove those "
                "lines on both sides, or pass drop_empty_eval_pairs=True to drop them with a warning."
            )
        self.empty_pairs_dropped[split] = len(empty)
        if split == "train":
            rank_zero_warn(
                f"{name}: {where}: dropped them from training (an empty sentence has nothing to encode "
                "or attend to, and would make the loss NaN)."
            )
        else:
            rank_zero_warn(
                f"{name}: {where}: dropped them (drop_empty_eval_pairs=True), so the {split!r} split has "
                f"{len(text) - len(empty)} pairs instead of {len(text)}: its scores are not comparable "
                "with results on the whole split."
            )
        return text.without(empty)

    def pairs(self, split: str) -> EncodedPairs:
        """The encoded pairs of ``split`` (training: after ``max_len`` filtering), all ranks' together."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._pairs:
            raise RuntimeError(
                f"{type(self).__name__}: the {split!r} split is not loaded; call setup() (or "
                "setup('fit') for train/valid, setup('test') for test) first"
            )
        return self._pairs[split]

    # ----------------------------------------------------------------------------------------------------
    def _current_epoch(self) -> int | None:
        return getattr(self.trainer, "current_epoch", None) if self.trainer is not None else None

    def train_dataset(self) -> TranslationBatchDataset:
        """This rank's training batches: new buckets and order every epoch (the trainer's epoch, else
        ``set_epoch``/a per-pass counter)."""
        pairs = self.pairs("train")
        src_len, tgt_len, size = pairs.src_lengths, pairs.tgt_lengths, self.batch_size

        def plan(epoch: int) -> list[Any]:
            return training_plan(src_len, tgt_len, size, generator(self.seed, "translation-train", epoch))

        fingerprint = {"pairs": len(pairs), "batch_size": size, "seed": self.seed}
        return TranslationBatchDataset(
            pairs, plan, len(pairs) // size, self.rank, self.world_size, fingerprint, epoch_fn=self._current_epoch
        )

    def eval_dataset(self, split: str, by_length: bool = True) -> TranslationBatchDataset:
        """This rank's fixed batches of ``split``, sorted by length or (``by_length=False``) in file order."""
        pairs = self.pairs(split)
        batches = evaluation_plan(pairs.src_lengths, pairs.tgt_lengths, self.batch_size, self.world_size, by_length)
        fingerprint = {"pairs": len(pairs), "batch_size": self.batch_size}
        return TranslationBatchDataset(
            pairs, lambda epoch: batches, len(batches), self.rank, self.world_size, fingerprint
        )

    def _eval_loader(self, split: str, by_length: bool = True) -> DataLoader[Any]:
        return DataLoader(self.eval_dataset(split, by_length), batch_size=None, num_workers=self.num_workers)

    def _training_batches_taken(self) -> int | None:
        return training_batches_taken(self.trainer)

    @override
    def train_dataloader(self) -> TranslationTrainLoader:
        """Bucketed training batches; resumable mid-epoch from a checkpoint."""
        return TranslationTrainLoader(self.train_dataset(), self.num_workers, self._training_batches_taken)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """Validation batches, sorted by length (``references`` follow each batch's rows)."""
        return self._eval_loader("valid")

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        """Test batches, sorted by length (``references`` follow each batch's rows)."""
        return self._eval_loader("test")

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        """The test split in file order (one process: the outputs concatenate to the file's order)."""
        return self._eval_loader("test", by_length=False)

    # ----------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """The vocabularies (once built), so that a checkpoint records which word each id means."""
        if self.src_vocab is None or self.tgt_vocab is None:
            return {}
        return {"src_vocab": self.src_vocab.state_dict(), "tgt_vocab": self.tgt_vocab.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's vocabularies, or check that the ones built from the data are the same.

        Raises:
            ValueError: the data gives other vocabularies than the checkpoint's model was trained with.
        """
        for name in ("src_vocab", "tgt_vocab"):
            if name not in state_dict:
                continue
            saved = TranslationVocabulary.from_state_dict(state_dict[name])
            built = getattr(self, name)
            if built is None:
                setattr(self, name, saved)
            elif built != saved:
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint's {name} ({len(saved)} tokens) differs from the one "
                    f"built from the data ({len(built)} tokens), so the model's ids would mean other words. Use "
                    "the same data, min_freq, max_vocab and max_len as the run that wrote the checkpoint."
                )
