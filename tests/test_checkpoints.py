"""A file that is not a checkpoint (a text file given as ``--ckpt_path`` or to ``load_from_checkpoint``) gets an
error naming it, not the unpickler's ``KeyError: 101``; real checkpoints still load."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_revrnn.checkpoints import NotACheckpointError, check_checkpoint_file
from lightning_revrnn.cli import main
from lightning_revrnn.lm import LanguageModel
from lightning_revrnn.translation.model import TranslationModel

SYNTHETIC = Path(__file__).resolve().parents[1] / "configs" / "synthetic-revgru.yaml"
NOT_CHECKPOINTS = {
    "hello.txt": (b"hello\n", r"it starts with b'hello\\n' \(text\)"),  # KeyError: 101 before
    "config.yaml": (b"model:\n  rnn: revgru\n", r"it starts with .* \(text\)"),
    "empty.ckpt": (b"", "it is empty"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
@pytest.mark.parametrize("model", [LanguageModel, TranslationModel])
def test_load_from_checkpoint_names_a_file_that_is_not_a_checkpoint(
    tmp_path: Path, name: str, model: type[pl.LightningModule]
) -> None:
    data, what = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(
        NotACheckpointError,
        match=rf"{re.escape(str(path))} is not a Lightning checkpoint: {what}.*Fix: pass the \.ckpt",
    ):
        model.load_from_checkpoint(path)
    with pytest.raises(NotACheckpointError, match="is not a Lightning checkpoint"):
        model.load_from_checkpoint(str(path))


def test_cli_ckpt_path_names_a_text_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["revrnn"])
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")
    with pytest.raises(NotACheckpointError, match=r"hello\.txt is not a Lightning checkpoint"):
        main(
            [
                "validate",
                "--config",
                str(SYNTHETIC),
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.accelerator",
                "cpu",
                "--ckpt_path",
                str(path),
            ]
        )


def test_real_checkpoints_and_other_paths_pass(tmp_path: Path) -> None:
    model = LanguageModel(8, emb_size=4, hidden_size=6)
    zipped, legacy = tmp_path / "model.ckpt", tmp_path / "legacy.ckpt"
    torch.save({"state_dict": model.state_dict()}, zipped)
    torch.save({"state_dict": {}}, legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, legacy, str(zipped), tmp_path / "missing.ckpt", "s3://bucket/model.ckpt", tmp_path):
        check_checkpoint_file(path)  # no error: Lightning reports missing files and URLs itself
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "lightning.ckpt")
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "lightning.ckpt")
    assert torch.equal(loaded.embedding.weight, model.embedding.weight)
    with pytest.raises(TypeError, match="cannot be called on an instance"):  # Lightning's guard is kept
        model.load_from_checkpoint(tmp_path / "lightning.ckpt")
