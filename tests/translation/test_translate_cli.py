"""``revrnn translate``: raw sentences from a file or stdin to translations in a file or on stdout, from a checkpoint
saved from Python and from one written by ``revrnn fit``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import QUIET

from lightning_revrnn.cli import main
from lightning_revrnn.translation.model import TranslationModel
from lightning_revrnn.translation.translate_cli import PROGRESS_MIN

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pytorch_lightning.cli"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
]


@pytest.fixture
def trained(trained_translation: Any) -> Any:
    return trained_translation


def _sentences(data: Any, count: int) -> list[str]:
    data.setup("test")
    sources = data.pairs("test").text.sources
    return [sources[i % len(sources)] for i in range(count)]


def test_stdin_to_stdout_with_a_progress_bar(trained: Any) -> None:
    """A subprocess, as a user runs it: every line translated in order, as translate_text does; a progress bar
    on stderr for a long input."""
    model, data, checkpoint = trained
    lines = _sentences(data, PROGRESS_MIN + 10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_revrnn.cli",
            "translate",
            "--ckpt_path",
            str(checkpoint),
            "--batch_size",
            "16",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == model.translate_text(lines)
    assert "translating" in done.stderr and f"{len(lines)}/{len(lines)}" in done.stderr


def test_files_and_an_empty_line(trained: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data, checkpoint = trained
    source, target = tmp_path / "in.en", tmp_path / "out.de"
    lines = _sentences(data, 5)
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    main(["translate", "--ckpt_path", str(checkpoint), "--input", str(source), "--output", str(target), "--beam", "1"])
    assert target.read_text(encoding="utf-8").splitlines() == model.translate_text(lines, beam=1)
    assert capsys.readouterr().err == ""  # a short input: no progress bar

    source.write_text("s1 s2\n\ns3\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_:
        main(["translate", "--ckpt_path", str(checkpoint), "--input", str(source), "--output", str(target)])
    assert exit_.value.code == 2
    assert f"line 2 of {source} is empty" in capsys.readouterr().err


def test_a_checkpoint_written_by_revrnn_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["revrnn"])  # LightningCLI warns about pytest's own arguments otherwise
    main(
        [
            "fit",
            "--model",
            "lightning_revrnn.translation.TranslationModel",
            "--model.hidden_size",
            "8",
            "--model.embedding_size",
            "6",
            "--model.slice_dim",
            "3",
            "--model.max_decode_len",
            "6",
            "--data",
            "lightning_revrnn.datamodules.SyntheticTranslationDataModule",
            "--data.vocab",
            "8",
            "--data.train_size",
            "32",
            "--data.val_size",
            "4",
            "--data.test_size",
            "4",
            "--data.batch_size",
            "8",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.logger",
            "false",
            *QUIET,
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    source, target = tmp_path / "in.en", tmp_path / "out.de"
    lines = ["s1 s2 s3", "s7", "s0 s4 s5 s6 s2"]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    main(["translate", "--ckpt_path", str(checkpoint), "--input", str(source), "--output", str(target)])
    want = TranslationModel.load_from_checkpoint(checkpoint).translate_text(lines)
    assert target.read_text(encoding="utf-8").splitlines() == want


def test_not_a_translation_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit):
        main(["translate", "--ckpt_path", str(tmp_path / "other.ckpt"), "--input", str(tmp_path / "missing.en")])
    assert "is not a TranslationModel checkpoint" in capsys.readouterr().err
