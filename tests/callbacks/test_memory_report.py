"""MemoryReport callback driven by a real Trainer (CPU: bytes saved for backward)."""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from lightning_revrnn.callbacks import MemoryReport
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
]

VOCAB = 50
FIELDS = ("normal_bits", "used_bits", "optimal_bits", "actual_ratio", "optimal_ratio", "drains")
STEPS = 3


def _fit(rnn: str, root: Path, num_layers: int = 2) -> tuple[pl.Trainer, MemoryReport, LanguageModel]:
    torch.manual_seed(0)
    model = LanguageModel(VOCAB, rnn=rnn, num_layers=num_layers, emb_size=16, hidden_size=24,
                          optimizer=partial(torch.optim.SGD, lr=0.5))
    data = SyntheticLMDataModule(vocab_size=VOCAB, train_tokens=2400, val_tokens=400, test_tokens=400, batch_size=8,
                                 eval_batch_size=8, bptt=30)
    report = MemoryReport()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=STEPS, limit_val_batches=1,
        logger=CSVLogger(root, name="mem"), log_every_n_steps=1, callbacks=[report], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(model, data)
    return trainer, report, model


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit of a reversible model and one of the GRU baseline (same data and sizes)."""
    out = {}
    for rnn in ("revgru", "gru"):
        root = tmp_path_factory.mktemp(rnn)
        out[rnn] = (*_fit(rnn, root), root)
    return out


def _memory_keys(metrics: dict[str, Any]) -> set[str]:
    return {k for k in metrics if k.startswith("memory/")}


def test_reversible_model_logs_measurement_and_accounting(runs: dict[str, Any]) -> None:
    trainer, report, model, _ = runs["revgru"]
    expected = {"memory/activation_bytes"} | {f"memory/{f}" for f in FIELDS}
    expected |= {f"memory/layer{l}/{f}" for l in range(2) for f in FIELDS}
    assert _memory_keys(trainer.callback_metrics) == expected
    assert _memory_keys(trainer.logged_metrics) == expected
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert m["memory/activation_bytes"] > 0
    # the logged accounting is the model's (one rank: sums are the values themselves) for the last step
    stats = model.memory_stats()
    assert stats is not None
    for f in ("normal_bits", "used_bits", "optimal_bits", "drains"):
        assert m[f"memory/{f}"] == pytest.approx(float(stats[f]))
        assert m[f"memory/{f}"] == pytest.approx(m[f"memory/layer0/{f}"] + m[f"memory/layer1/{f}"])
    assert m["memory/actual_ratio"] == pytest.approx(m["memory/normal_bits"] / m["memory/used_bits"])
    assert m["memory/optimal_ratio"] == pytest.approx(m["memory/normal_bits"] / m["memory/optimal_bits"])
    assert m["memory/actual_ratio"] > 1  # the buffer is smaller than storing every state


def test_baseline_logs_only_the_measurement(runs: dict[str, Any]) -> None:
    trainer, report, model, _ = runs["gru"]
    assert model.memory_stats() is None
    assert _memory_keys(trainer.callback_metrics) == {"memory/activation_bytes"}
    assert _memory_keys(trainer.logged_metrics) == {"memory/activation_bytes"}
    assert all(set(row) == {"step", "memory/activation_bytes"} for row in report.history)


def test_reversible_activation_memory_is_far_below_the_baseline(runs: dict[str, Any]) -> None:
    rev = [row["memory/activation_bytes"] for row in runs["revgru"][1].history]
    base = [row["memory/activation_bytes"] for row in runs["gru"][1].history]
    assert len(rev) == len(base) == STEPS
    assert all(r > 0 for r in rev) and all(b > 0 for b in base)
    logits_bytes = 30 * 8 * VOCAB * 4  # T * B * vocab float32: what the baseline keeps at least once
    assert min(base) >= logits_bytes
    assert max(rev) * 5 < min(base), (rev, base)
    assert max(rev) < logits_bytes


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_report_files_in_log_dir(runs: dict[str, Any], rnn: str) -> None:
    trainer, report, _, root = runs[rnn]
    log_dir = Path(trainer.log_dir)
    assert log_dir.is_relative_to(root) and log_dir != root  # the logger's version folder
    report_json, report_png = log_dir / "memory_report.json", log_dir / "memory_report.png"
    assert report_json.is_file() and report_png.is_file()
    assert report_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report_json.read_text())
    assert set(data) == {"summary", "steps"}
    assert len(data["steps"]) == trainer.global_step == STEPS
    assert [row["step"] for row in data["steps"]] == [1.0, 2.0, 3.0]
    assert data["steps"] == report.history
    assert data["summary"] == pytest.approx(report.summary())
    assert "memory/activation_bytes" in data["summary"]
    assert ("memory/actual_ratio" in data["summary"]) == (rnn == "revgru")
    median = sorted(row["memory/activation_bytes"] for row in data["steps"])[1]
    assert data["summary"]["memory/activation_bytes"] == pytest.approx(median)


def test_metrics_reach_the_csv_logger(runs: dict[str, Any]) -> None:
    trainer, *_ = runs["revgru"]
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    values = [float(r["memory/activation_bytes"]) for r in rows if r.get("memory/activation_bytes")]
    assert len(values) == STEPS and all(v > 0 for v in values)
    ratios = [float(r["memory/layer1/actual_ratio"]) for r in rows if r.get("memory/layer1/actual_ratio")]
    assert len(ratios) == STEPS and all(math.isfinite(r) and r > 1 for r in ratios)


def test_plot_can_be_disabled(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LanguageModel(VOCAB, rnn="revgru", emb_size=16, optimizer=partial(torch.optim.SGD, lr=0.5))
    data = SyntheticLMDataModule(vocab_size=VOCAB, train_tokens=800, val_tokens=200, test_tokens=200, batch_size=4,
                                 eval_batch_size=4, bptt=10)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                         callbacks=[MemoryReport(plot=False)], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    # no logger: the report goes to default_root_dir
    assert (tmp_path / "memory_report.json").is_file()
    assert not (tmp_path / "memory_report.png").exists()
