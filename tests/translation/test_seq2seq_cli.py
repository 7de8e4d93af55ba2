"""The ``revrnn`` command with a translation config: fit, test (prints test BLEU), predict (writes a file),
on the shared Multi30K data with a tiny model and a few batches."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import QUIET

from lightning_revrnn.cli import main
from lightning_revrnn.datamodules.bucketing import evaluation_plan
from lightning_revrnn.translation.model import TranslationModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*The dirpath has changed from.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
    # one training step, no validation: the config's ModelCheckpoint saves last.ckpt without val_ppl
    pytest.mark.filterwarnings("ignore:.*could not find the monitored key.*"),
]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "multi30k-revgru.yaml"
DATA_DIR = Path(os.environ.get("REVRNN_DATA_DIR", "/work/shared/data"))
TINY = [
    "--model.hidden_size",
    "16",
    "--model.embedding_size",
    "8",
    "--model.slice_dim",
    "4",
    "--model.max_decode_len",
    "6",
    "--model.beam",
    "2",
    "--data.batch_size",
    "16",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` are given while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["revrnn"])


def _common(root: Path, name: str) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        *TINY,
        "--data.data_dir",
        str(DATA_DIR / "multi30k"),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--trainer.limit_predict_batches",
        "2",
        "--trainer.default_root_dir",
        str(root),
        *QUIET,
        "--trainer.logger.save_dir",
        str(root),
        "--trainer.logger.name",
        name,
        "--trainer.log_every_n_steps",
        "1",
    ]


@pytest.mark.skipif(not (DATA_DIR / "multi30k" / "tok").is_dir(), reason="Multi30K not under REVRNN_DATA_DIR")
def test_fit_test_predict_with_the_multi30k_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the config's checkpoint folder is relative: logs/multi30k-revgru/checkpoints
    main(
        [
            "fit",
            *_common(tmp_path, "fit"),
            "--trainer.max_steps",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.callbacks.init_args.every_n_steps",
            "1",
        ]
    )  # the config's MemoryReport: measure the step
    fit_dir = tmp_path / "fit" / "version_0"
    with (fit_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r.get("train_loss")]) == 1
    measured = [r for r in rows if r.get("memory/encoder/actual_ratio")]
    assert measured and measured[0]["memory/decoder/actual_ratio"]  # MemoryReport accounts for each side
    assert float(measured[0]["memory/encoder/stored_bits"]) > 0 == float(measured[0]["memory/decoder/stored_bits"])
    assert yaml.safe_load((fit_dir / "config.yaml").read_text())["model"]["init_args"]["rnn"] == "revgru"
    ckpt = tmp_path / "logs" / "multi30k-revgru" / "checkpoints" / "last.ckpt"
    model = TranslationModel.load_from_checkpoint(ckpt)
    assert model.hparams["tgt_vocab_size"] == 18726 and model.hparams["hidden_size"] == 16

    capsys.readouterr()
    main(["test", *_common(tmp_path, "test"), "--ckpt_path", str(ckpt)])
    assert "test_bleu" in capsys.readouterr().out  # Lightning prints the test metrics

    out = tmp_path / "translations.de"
    main(["predict", *_common(tmp_path, "predict"), "--ckpt_path", str(ckpt), "--model.prediction_file", str(out)])
    lines = out.read_text(encoding="utf-8").splitlines()
    plan = evaluation_plan(torch.ones(1000), torch.ones(1000), 16, by_length=False)  # test2016 in file order
    assert len(lines) == len(plan[0]) + len(plan[1]) and all(lines)  # two predict batches, one line per sentence
