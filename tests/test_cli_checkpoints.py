"""Checkpoints are interchangeable between Python and the ``revrnn`` command, both ways, for both models.

A checkpoint saved from Python (a plain ``Trainer``) runs with ``revrnn test`` / ``revrnn predict`` and the
shipped config, giving the numbers the Python model gives; one written by ``revrnn fit`` loads with
``load_from_checkpoint``. The command runs as a subprocess (as a user runs it), on the embedded synthetic data
with tiny models and two training steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from cli_helpers import CONFIGS, QUIET, last_value, revrnn, state_dict

from lightning_revrnn.datamodules import SyntheticLMDataModule, SyntheticTranslationDataModule
from lightning_revrnn.lm import LanguageModel
from lightning_revrnn.translation.model import TranslationModel

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli"),  # jsonargparse, in Lightning
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
]

LM_DATA: dict[str, Any] = dict(
    vocab_size=32, batch_size=16, bptt=35, train_tokens=3000, val_tokens=700, test_tokens=700
)
NMT_DATA: dict[str, Any] = dict(train_size=64, val_size=16, test_size=16, batch_size=16, max_len=12)
#: Decoding settings are not saved in checkpoints: the command gets the ones the Python model used.
NMT_DECODING = ["--model.beam", "2", "--model.max_decode_len", "6"]


def _data_args(values: dict[str, Any]) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--data.{key}", str(value))]


LM_ARGS = ["--config", str(CONFIGS / "synthetic-revgru.yaml"), *_data_args(LM_DATA), *QUIET]
# The Multi30K config with the embedded translation task in place of the corpus (no download)
NMT_ARGS = [
    "--config",
    str(CONFIGS / "multi30k-revgru.yaml"),
    "--data",
    "lightning_revrnn.datamodules.SyntheticTranslationDataModule",
    *_data_args(NMT_DATA),
    *QUIET,
    *NMT_DECODING,
]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: the same arithmetic
    yield
    torch.set_num_threads(threads)


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def _csv_logger(root: Path, name: str) -> list[str]:
    return [
        "--trainer.logger",
        "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(root),
        "--trainer.logger.name",
        name,
        "--trainer.logger.version",
        "0",
    ]


def _cli_checkpoint(root: Path) -> Path:
    """The newest checkpoint under ``root`` (the config says where ``revrnn fit`` writes them), not Python's."""
    found = [p for p in root.rglob("*.ckpt") if p.name != "python.ckpt"]
    assert found, f"revrnn fit wrote no checkpoint under {root}"
    return max(found, key=lambda p: p.stat().st_mtime)


def _same_weights(model: pl.LightningModule, path: Path) -> None:
    saved = state_dict(path)
    own = model.state_dict()
    assert own.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(own[name], value), name


def test_language_model_checkpoints_work_both_ways(tmp_path: Path) -> None:
    # Python -> revrnn test: sizes other than the config's, so only the checkpoint's hyperparameters can build it
    pl.seed_everything(0)
    data = SyntheticLMDataModule(**LM_DATA)
    model = LanguageModel(rnn="revgru", emb_size=16, hidden_size=16, num_layers=1)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, data)
    python_ckpt = tmp_path / "python.ckpt"
    trainer.save_checkpoint(python_ckpt)
    direct = _trainer(limit_test_batches=2).test(model, data, verbose=False)[0]["test_ppl"]

    revrnn(
        "test",
        *LM_ARGS,
        "--ckpt_path",
        str(python_ckpt),
        "--trainer.limit_test_batches",
        "2",
        *_csv_logger(tmp_path, "test"),
        cwd=tmp_path,
    )
    assert last_value(tmp_path / "test" / "version_0", "test_ppl") == pytest.approx(direct, rel=1e-5)

    # revrnn fit -> LanguageModel.load_from_checkpoint
    fit_root = tmp_path / "fit"
    revrnn(
        "fit",
        *LM_ARGS,
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(fit_root),
        *_csv_logger(fit_root, "fit"),
        cwd=tmp_path,
    )
    cli_ckpt = _cli_checkpoint(tmp_path)
    loaded = LanguageModel.load_from_checkpoint(cli_ckpt)
    assert loaded.hparams["emb_size"] == 64 and loaded.hparams["vocab_size"] == 32  # the config's, the data's
    _same_weights(loaded, cli_ckpt)
    assert 1 < _trainer(limit_test_batches=2).test(loaded, data, verbose=False)[0]["test_ppl"] < 100


def test_translation_model_checkpoints_work_both_ways(tmp_path: Path) -> None:
    # Python -> revrnn test and revrnn predict, with the Multi30K config (sizes from the checkpoint)
    pl.seed_everything(0)
    data = SyntheticTranslationDataModule(**NMT_DATA)
    model = TranslationModel("revgru", hidden_size=16, embedding_size=8, slice_dim=4, beam=2, max_decode_len=6)
    trainer = _trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(model, data)
    python_ckpt = tmp_path / "python.ckpt"
    trainer.save_checkpoint(python_ckpt)
    direct = _trainer().test(model, data, verbose=False)[0]
    translations = [line for batch in _trainer().predict(model, data) for line in batch]  # type: ignore[union-attr]

    revrnn("test", *NMT_ARGS, "--ckpt_path", str(python_ckpt), *_csv_logger(tmp_path, "test"), cwd=tmp_path)
    for key in ("test_loss", "test_bleu"):
        assert last_value(tmp_path / "test" / "version_0", key) == pytest.approx(direct[key], rel=1e-5, abs=1e-6)
    out = tmp_path / "translations.de"
    revrnn(
        "predict",
        *NMT_ARGS,
        "--ckpt_path",
        str(python_ckpt),
        "--model.prediction_file",
        str(out),
        *_csv_logger(tmp_path, "predict"),
        cwd=tmp_path,
    )
    assert out.read_text(encoding="utf-8").splitlines() == translations and len(translations) == 16

    # revrnn fit -> TranslationModel.load_from_checkpoint (with its vocabularies: it translates on its own)
    fit_root = tmp_path / "fit"
    revrnn(
        "fit",
        *NMT_ARGS,
        "--model.hidden_size",
        "16",
        "--model.embedding_size",
        "8",
        "--model.slice_dim",
        "4",
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(fit_root),
        *_csv_logger(fit_root, "fit"),
        cwd=tmp_path,
    )
    cli_ckpt = _cli_checkpoint(tmp_path)
    loaded = TranslationModel.load_from_checkpoint(cli_ckpt, beam=2, max_decode_len=6)
    assert loaded.hparams["hidden_size"] == 16 and loaded.hparams["tgt_vocab_size"] == len(data.tgt_vocab or [])
    _same_weights(loaded, cli_ckpt)
    batch = next(iter(data.test_dataloader()))
    assert len(loaded.hypotheses(loaded.translate(batch.src, batch.src_keep))) == len(batch.references)
