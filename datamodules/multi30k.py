"""Multi30K task 1, English→German: the official lower-cased, normalised, Moses-tokenised files.

``data_dir`` (default ``$REVRNN_DATA_DIR/multi30k``, else the cache) holds them in ``tok/``:
``{train,val,test_2016_flickr}.lc.norm.tok.{en,de}``, 29,000 / 1,014 / 1,000 pairs. They are the text the
paper's BLEU was computed on; like every Moses-tokenised text they keep Moses' escapes (``&apos;``,
``&quot;``, ``&amp;``), which a Moses detokeniser turns back into characters.
"""

from __future__ import annotations

from pathlib import Path

from typing_extensions import override

from .corpus import decode_utf8, split_lines
from .download import CorpusSpec, FileMirror, default_data_dir, ensure_files, read_verified
from .errors import CorpusFormatError
from .parallel import ParallelText
from .preprocessing import MULTI30K_PREPROCESSING
from .translation_datamodule import TranslationDataModule

_SPLIT_STEMS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
_MULTI30K_FILES = {
    f"{split}.{lang}": f"{stem}.lc.norm.tok.{lang}" for split, stem in _SPLIT_STEMS.items() for lang in ("en", "de")
}
_MULTI30K_COMMIT = "7bee46bc74186b4b6254603143610f730d40bf66"
"""Commit of ``multi30k/dataset`` the checksums were taken from (the tok files there)."""


def _github_raw(ref: str) -> FileMirror:
    base = f"https://raw.githubusercontent.com/multi30k/dataset/{ref}/data/task1/tok"
    return FileMirror({name: f"{base}/{name}" for name in _MULTI30K_FILES.values()})


MULTI30K_SPEC = CorpusSpec(
    name="Multi30K task 1 (tokenised)",
    subdir="multi30k/tok",
    files=_MULTI30K_FILES,
    sha256={
        "train.lc.norm.tok.en": "08925f8e0572bcd5a006702fc5fe20e2d77c6917d4eebd576fc20de6693c2119",
        "train.lc.norm.tok.de": "cb5a23529b65ec2061f1dc446192a9c37382b63cc75f81a0be59d34894b3a505",
        "val.lc.norm.tok.en": "46573ce391ae227f1c72f873392436a20ef18e0a6d518098cfbd70b77c8572ec",
        "val.lc.norm.tok.de": "97232bd273eceb7207f689527386a97e4be2616b18ada47576bdaf96c8ae1f00",
        "test_2016_flickr.lc.norm.tok.en": "5b7f32627cf99eced828311b955dae9800bb52bc8b91cf8b6526829e605b29d2",
        "test_2016_flickr.lc.norm.tok.de": "c6a33d39d48f9f510de147651316cd9d918e09ad0219df734a2f16b6baccacc4",
    },
    # The official repository: first at the commit the checksums come from, then its current master.
    mirrors=(_github_raw(_MULTI30K_COMMIT), _github_raw("master")),
)
"""The six tokenised task-1 files of the official Multi30K repository (``multi30k/dataset``)."""


class Multi30KDataModule(TranslationDataModule):
    """Multi30K English→German (task 1): 29,000 / 1,014 / 1,000 pairs (train / val / test2016 Flickr).

    :meth:`prepare_data` verifies the files present (SHA-256) and downloads missing ones from the mirrors
    (unless ``download=False``); a missing or corrupt file raises an error naming it, the URLs and where to put
    it. See :class:`~.translation_datamodule.TranslationDataModule` for batching.
    """

    spec = MULTI30K_SPEC
    text_preprocessing = MULTI30K_PREPROCESSING

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        min_freq: int = 1,
        max_vocab: int | None = None,
        max_len: int = 50,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        """``data_dir``: the folder holding ``tok/`` (default ``$REVRNN_DATA_DIR/multi30k``, else
        ``~/.cache/lightning-revrnn/multi30k``); ``download``: fetch missing files in :meth:`prepare_data`."""
        super().__init__(batch_size, min_freq, max_vocab, max_len, num_workers, seed)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir("multi30k")
        self.download = bool(download)

    @property
    def tok_dir(self) -> Path:
        """The folder of the tokenised files (``data_dir/tok``)."""
        return self.data_dir / "tok"

    @override
    def prepare_data(self) -> None:
        """Verify the files present and download the missing ones (atomically, checksummed)."""
        ensure_files(self.spec, self.tok_dir, download=self.download)

    def _lines(self, key: str) -> list[str]:
        name = self.spec.files[key]
        data = read_verified(self.spec, self.tok_dir, name)
        return [" ".join(line.split()) for line in split_lines(decode_utf8(data, str(self.tok_dir / name)))]

    @override
    def read_split(self, split: str) -> ParallelText:
        """The ``split`` pairs as in the files (one sentence per line, whitespace normalised)."""
        sources, targets = self._lines(f"{split}.{self.src_lang}"), self._lines(f"{split}.{self.tgt_lang}")
        names = [self.spec.files[f"{split}.{lang}"] for lang in (self.src_lang, self.tgt_lang)]
        if len(sources) != len(targets):
            raise CorpusFormatError(
                f"{self.tok_dir}: {names[0]} has {len(sources)} lines but {names[1]} has {len(targets)}; "
                "the two sides of a split must be aligned line by line. Replace them with the official files."
            )
        text = ParallelText(sources, targets)
        text.check_nonempty(f"{self.tok_dir}/{{{','.join(names)}}}")
        return text
