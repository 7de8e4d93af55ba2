"""A TranslationModel owns its vocabularies: the checkpoint keeps the tokens, a loaded model decodes with them,
and a DataModule whose ids mean other words is refused on every route, naming what differs and the fix.

The synthetic task with 48 or 40 training pairs gives vocabularies of the same size (12 ids) whose words are
ordered differently (by training frequency): the case that used to decode silently with the wrong words."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from seq2seq_helpers import synthetic_data, tiny_model

from lightning_revrnn.datamodules.translation import SyntheticTranslationDataModule, TranslationVocabulary
from lightning_revrnn.translation.model import TranslationModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
]

STAGES = ("fit", "validate", "test", "predict")


def _trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        max_steps=1,
        limit_train_batches=1,
        limit_val_batches=1,
        limit_test_batches=1,
        limit_predict_batches=1,
        num_sanity_val_steps=0,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


def _run(trainer: pl.Trainer, stage: str, model: TranslationModel, data: Any, **kwargs: Any) -> Any:
    if stage == "fit":
        return trainer.fit(model, data, **kwargs)
    return getattr(trainer, stage)(model, data, **kwargs)


def _other_data() -> SyntheticTranslationDataModule:
    """Same task, same vocabulary sizes, other ids (fewer training pairs: another frequency order)."""
    return synthetic_data(train_size=40)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fit for two steps on ``synthetic_data()``, saved from Python."""
    root = tmp_path_factory.mktemp("vocab")
    with torch.device("cpu"):
        pl.seed_everything(0, verbose=False)
        model = tiny_model(vocab=None, optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
        trainer = _trainer(root, max_steps=2, limit_train_batches=2, limit_val_batches=0)
        trainer.fit(model, synthetic_data())
        trainer.save_checkpoint(root / "model.ckpt")
    return root / "model.ckpt"


def test_the_two_datamodules_differ_in_ids_only() -> None:
    ours, other = synthetic_data(), _other_data()
    ours.setup("fit")
    other.setup("fit")
    assert ours.src_vocab_size == other.src_vocab_size and ours.tgt_vocab_size == other.tgt_vocab_size
    assert ours.src_vocab != other.src_vocab and ours.tgt_vocab != other.tgt_vocab


def test_the_checkpoint_holds_the_tokens(checkpoint: Path) -> None:
    saved = torch.load(checkpoint, weights_only=False)["revrnn_vocab"]
    data = synthetic_data()
    data.setup("fit")
    assert data.src_vocab is not None and data.tgt_vocab is not None
    assert saved["src"]["tokens"] == data.src_vocab.tokens and saved["tgt"]["tokens"] == data.tgt_vocab.tokens
    loaded = TranslationModel.load_from_checkpoint(checkpoint)
    assert loaded.src_vocab == data.src_vocab and loaded.tgt_vocab == data.tgt_vocab


@pytest.mark.parametrize("stage", STAGES)
def test_a_loaded_model_refuses_a_datamodule_with_other_ids(checkpoint: Path, stage: str, tmp_path: Path) -> None:
    model = TranslationModel.load_from_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="vocabular") as error:
        _run(_trainer(tmp_path), stage, model, _other_data())
    message = str(error.value)
    assert "SyntheticTranslationDataModule" in message and "both 12 tokens" in message
    assert re.search(r"id \d+ is 's\d' in the model but 's\d' in", message), message  # what differs, in words
    assert "Fix:" in message and "data.src_vocab, data.tgt_vocab = model.src_vocab, model.tgt_vocab" in message


@pytest.mark.parametrize("stage", STAGES)
def test_ckpt_path_refuses_a_datamodule_with_other_ids(checkpoint: Path, stage: str, tmp_path: Path) -> None:
    model = tiny_model(vocab=None)  # built from the DataModule in setup, then restored from the checkpoint
    with pytest.raises(ValueError, match="vocabular") as error:
        _run(_trainer(tmp_path), stage, model, _other_data(), ckpt_path=str(checkpoint))
    message = str(error.value)
    assert "checkpoint" in message and "both 12 tokens" in message and "Fix:" in message
    assert re.search(r"id \d+ is '[st]\d' in the checkpoint but '[st]\d' in", message), message


@pytest.mark.parametrize("stage", STAGES)
def test_the_same_data_keeps_working(checkpoint: Path, stage: str, tmp_path: Path) -> None:
    """A fresh DataModule with the training settings has the same vocabularies: every route runs, loaded or by
    ckpt_path."""
    _run(_trainer(tmp_path), stage, TranslationModel.load_from_checkpoint(checkpoint), synthetic_data())
    _run(_trainer(tmp_path), stage, tiny_model(vocab=None), synthetic_data(), ckpt_path=str(checkpoint))


def test_the_named_fix_works_and_decodes_with_the_models_words(checkpoint: Path, tmp_path: Path) -> None:
    """Handing the model's vocabularies to the other DataModule (the message's fix) gives the predictions of the
    training data's own DataModule for the same sentences."""
    model = TranslationModel.load_from_checkpoint(checkpoint)
    want = _trainer(tmp_path).predict(model, synthetic_data())
    data = _other_data()
    data.src_vocab, data.tgt_vocab = model.src_vocab, model.tgt_vocab
    assert _trainer(tmp_path).predict(model, data) == want  # the test split does not depend on train_size
    _trainer(tmp_path).test(model, data, verbose=False)


def test_a_model_trained_then_tested_on_the_same_datamodule(tmp_path: Path) -> None:
    data = synthetic_data()
    model = tiny_model(vocab=None)
    trainer = _trainer(tmp_path)
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    with pytest.raises(ValueError, match="vocabular"):  # and a second DataModule with other ids is refused
        _trainer(tmp_path).test(model, _other_data(), verbose=False)


def test_difference_in_words() -> None:
    a = TranslationVocabulary.build([["x", "y", "y"]])
    b = TranslationVocabulary.build([["x", "x", "y"]])
    assert a.difference(a) == ""
    assert a.difference(b, ("mine", "yours")) == (
        "both 6 tokens; 2 of the first 6 ids mean another word, e.g. id 4 is 'y' in mine but 'x' in yours"
    )
    c = TranslationVocabulary.build([["y", "y", "x", "z"]])
    assert a.difference(c).startswith("this 6 tokens, other 7; the first 6 ids agree")
