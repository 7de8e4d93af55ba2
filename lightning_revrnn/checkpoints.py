"""A clear error for a file that is not a checkpoint at all, before ``torch.load`` fails on it.

``torch.load`` of a text file (a config, a prediction file, a log passed as ``--ckpt_path`` by mistake) fails
inside the unpickler with whatever its first bytes mean to it (``KeyError: 101``, ``IndexError: pop from empty
list``...). :func:`check_checkpoint_file` reads the first bytes instead and names the file. The models'
``load_from_checkpoint`` and the ``revrnn`` CLI's ``--ckpt_path`` call it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from typing_extensions import Self

try:  # Lightning's "classmethod that refuses to run on an instance", as LightningModule's own
    from pytorch_lightning.utilities.model_helpers import _restricted_classmethod as _class_only
except ImportError:  # pragma: no cover - a Lightning without it
    _class_only = classmethod  # type: ignore[misc]

#: How a ``torch.save`` archive starts (a zip file, the default since torch 1.6).
ZIP_MAGIC = b"PK\x03\x04"
#: How a legacy ``torch.save`` file starts (a pickle's PROTO opcode).
PICKLE_PROTO = 0x80


class NotACheckpointError(ValueError):
    """The file given as a checkpoint is not one (not a ``torch.save`` archive)."""


def check_checkpoint_file(path: Any) -> None:
    """Raise :class:`NotACheckpointError` naming ``path`` if it is a local file that is not a ``torch.save``
    archive (a zip file, or a legacy pickle). Anything else (a URL, a file object, a missing path) is left to
    Lightning, which reports those itself."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        return
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC) or (head and head[0] == PICKLE_PROTO):
        return
    if not head:
        what = "it is empty"
    else:
        text = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
        what = f"it starts with {head!r}{' (text)' if text else ''}"
    raise NotACheckpointError(
        f"{os.fspath(path)} is not a Lightning checkpoint: {what}, while a checkpoint (written by ModelCheckpoint "
        "or Trainer.save_checkpoint with torch.save) is a zip archive starting with b'PK\\x03\\x04'. Fix: pass "
        "the .ckpt file a fit wrote (e.g. lightning_logs/version_0/checkpoints/*.ckpt), not a config, log or "
        "prediction file."
    )


class CheckpointFileCheck(pl.LightningModule):
    """A LightningModule whose ``load_from_checkpoint`` first checks that the file is a checkpoint at all
    (:func:`check_checkpoint_file`), so a text file gets an error naming it instead of an unpickler's
    ``KeyError``."""

    @_class_only
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Self:
        """:meth:`LightningModule.load_from_checkpoint`, after :func:`check_checkpoint_file`.

        Raises:
            NotACheckpointError: ``checkpoint_path`` is a local file that is not a checkpoint.
        """
        check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
