"""The ``revrnn`` command line (LightningCLI): fit / validate / test with the shipped configs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from cli_helpers import QUIET

from lightning_revrnn.cli import main
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    # validate/test restore the fit run's ModelCheckpoint state into a new log folder
    pytest.mark.filterwarnings("ignore:.*The dirpath has changed from.*"),
    # jsonargparse >= 4.49 deprecations triggered inside pytorch_lightning.cli, not by this project
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli"),
]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SYNTHETIC = ROOT / "configs" / "synthetic-revgru.yaml"
DATA_DIR = Path(os.environ.get("REVRNN_DATA_DIR", "/work/shared/data"))
CORPUS_DIRS = {"ptb": "ptb", "wikitext2": "wikitext-2", "multi30k": "multi30k", "iwslt16": "iwslt2016-de-en"}
SMALL_DATA = ["--data.train_tokens", "3000", "--data.val_tokens", "700", "--data.test_tokens", "700"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` are given while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["revrnn"])


def _common(root: Path, name: str) -> list[str]:
    return [
        "--config",
        str(SYNTHETIC),
        *SMALL_DATA,
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
        "--trainer.default_root_dir",
        str(root),
        *QUIET,
        "--trainer.logger",
        "pytorch_lightning.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(root),
        "--trainer.logger.name",
        name,
        "--trainer.log_every_n_steps",
        "1",
    ]


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    with (log_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _only_version(root: Path, name: str) -> Path:
    versions = sorted((root / name).glob("version_*"))
    assert len(versions) == 1, versions
    return versions[0]


def test_fit_then_validate_and_test_from_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config's checkpoint folder is relative: logs/synthetic-revgru/checkpoints
    main(["fit", *_common(tmp_path, "fit"), "--trainer.max_steps", "3"])
    fit_dir = _only_version(tmp_path, "fit")
    checkpoints = sorted((tmp_path / "logs" / "synthetic-revgru" / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["last.ckpt"]  # where max_steps stopped: no validation ran yet
    ckpt = checkpoints[0]
    saved = yaml.safe_load((fit_dir / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 3
    assert saved["model"]["init_args"]["rnn"] == "revgru" and saved["data"]["init_args"]["train_tokens"] == 3000
    losses = [float(r["train_loss"]) for r in _metrics(fit_dir) if r.get("train_loss")]
    assert len(losses) == 3 and all(0 < l < 100 for l in losses)
    assert (fit_dir / "memory_report.json").is_file()  # the config's MemoryReport callback ran

    model = LanguageModel.load_from_checkpoint(ckpt)
    assert model.hparams["vocab_size"] == 32  # read from the DataModule in setup()
    assert model.hparams["emb_size"] == 64

    main(["validate", *_common(tmp_path, "validate"), "--ckpt_path", str(ckpt)])
    val = [float(r["val_ppl"]) for r in _metrics(_only_version(tmp_path, "validate")) if r.get("val_ppl")]
    main(["test", *_common(tmp_path, "test"), "--ckpt_path", str(ckpt)])
    test = [float(r["test_ppl"]) for r in _metrics(_only_version(tmp_path, "test")) if r.get("test_ppl")]
    assert len(val) == 1 and len(test) == 1

    # the CLI evaluated the checkpoint's weights: the same numbers from the checkpoint loaded directly
    data = SyntheticLMDataModule(
        vocab_size=32, batch_size=16, bptt=35, train_tokens=3000, val_tokens=700, test_tokens=700
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        limit_test_batches=2,
    )
    direct_val = trainer.validate(model, data, verbose=False)[0]["val_ppl"]
    direct_test = trainer.test(model, data, verbose=False)[0]["test_ppl"]
    assert val[0] == pytest.approx(direct_val, rel=1e-5)
    assert test[0] == pytest.approx(direct_test, rel=1e-5)
    assert 1 < val[0] < 1000 and val[0] != pytest.approx(test[0], rel=1e-6)


def _data_present(config: Path) -> Path | None:
    """The corpus folder a config needs, or None for the synthetic one."""
    for prefix, sub in CORPUS_DIRS.items():
        if config.name.startswith(prefix + "-"):
            return DATA_DIR / sub
    return None


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _data_present(config)
    if folder is not None and not folder.is_dir():
        pytest.skip(f"corpus folder {folder} absent (set REVRNN_DATA_DIR)")
    monkeypatch.setenv("REVRNN_DATA_DIR", str(DATA_DIR))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    assert printed["model"]["init_args"]["rnn"] == source["model"]["init_args"]["rnn"]
    assert printed["data"]["class_path"] == source["data"]["class_path"]
    assert printed["trainer"]["max_epochs"] == source["trainer"]["max_epochs"]
    assert printed["trainer"]["gradient_clip_val"] == source["trainer"]["gradient_clip_val"]
    for key, value in source["data"]["init_args"].items():
        assert printed["data"]["init_args"][key] == value, key


def test_unknown_option_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(SYNTHETIC), "--model.no_such_option", "1", "--print_config"])
    assert exit_info.value.code not in (0, None)


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "revrnn"
    assert script.is_file() and os.access(script, os.X_OK)
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test"):
        assert sub in proc.stdout
