"""MemoryReport callback driven by a real Trainer on CPU (allocation trace + the paper's accounting)."""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_revrnn import RevLSTM
from lightning_revrnn.callbacks import MemoryReport
from lightning_revrnn.callbacks.memory_report import MEASURED, PREFIX
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel, RnnType

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
]

VOCAB = 50
FIELDS = (
    "normal_bits",
    "used_bits",
    "optimal_bits",
    "stored_bits",
    "actual_ratio",
    "optimal_ratio",
    "drains",
    "windows",
)
MEASURED_KEYS = {PREFIX + k for k in MEASURED}
STEPS = 3
#: Window length: four chunks of the reverse sweep (its working set is one chunk, the baseline's the window).
BPTT = 64


def _trainer(root: Path, report: MemoryReport, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=STEPS,
        limit_val_batches=1,
        logger=CSVLogger(root, name="mem"),
        log_every_n_steps=1,
        callbacks=[report],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def _lm(rnn: RnnType, num_layers: int = 2) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(
        VOCAB, rnn=rnn, num_layers=num_layers, emb_size=16, hidden_size=24, optimizer=partial(torch.optim.SGD, lr=0.5)
    )


def _data(batch_size: int = 8, bptt: int = BPTT) -> SyntheticLMDataModule:
    return SyntheticLMDataModule(
        vocab_size=VOCAB,
        train_tokens=2400,
        val_tokens=400,
        test_tokens=400,
        batch_size=batch_size,
        eval_batch_size=8,
        bptt=bptt,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One fit of a reversible LM and one of the GRU baseline (same data and sizes), every step measured."""
    out: dict[str, Any] = {}
    rnns: tuple[RnnType, ...] = ("revgru", "gru")
    for rnn in rnns:
        root = tmp_path_factory.mktemp(rnn)
        report, model = MemoryReport(every_n_steps=1), _lm(rnn)
        trainer = _trainer(root, report)
        trainer.fit(model, _data())
        out[rnn] = (trainer, report, model, root)
    return out


def _memory_keys(metrics: dict[str, Any]) -> set[str]:
    return {k for k in metrics if k.startswith(PREFIX)}


def test_reversible_model_logs_measurement_and_accounting(runs: dict[str, Any]) -> None:
    trainer, _report, model, _ = runs["revgru"]
    expected = MEASURED_KEYS | {f"memory/{f}" for f in FIELDS} | {f"memory/rnn/{f}" for f in FIELDS}
    expected |= {f"memory/rnn/layer{l}/{f}" for l in range(2) for f in FIELDS}
    assert _memory_keys(trainer.callback_metrics) == expected
    assert _memory_keys(trainer.logged_metrics) == expected
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert m["memory/peak_bytes"] >= m["memory/peak_excl_grad_bytes"] > 0
    assert m["memory/saved_bytes"] > 0
    # every parameter got a fresh gradient (Lightning zeroes with set_to_none): the tied weight counts once
    assert m["memory/grad_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    # the logged accounting is the module's last (only) window of the step: one rank, one window
    stats = model.rnn.memory_stats()
    assert m["memory/windows"] == m["memory/rnn/windows"] == m["memory/rnn/layer1/windows"] == 1
    for f in ("normal_bits", "used_bits", "optimal_bits", "drains"):
        assert m[f"memory/{f}"] == m[f"memory/rnn/{f}"] == pytest.approx(float(getattr(stats, f)))
        assert m[f"memory/{f}"] == pytest.approx(m[f"memory/rnn/layer0/{f}"] + m[f"memory/rnn/layer1/{f}"])
    assert m["memory/normal_bits"] == 32 * BPTT * 8 * (24 + 16)  # T · B · (H of each layer) · 32 bits
    assert m["memory/actual_ratio"] == pytest.approx(m["memory/normal_bits"] / m["memory/used_bits"])
    assert m["memory/optimal_ratio"] == pytest.approx(m["memory/normal_bits"] / m["memory/optimal_bits"])
    assert m["memory/actual_ratio"] > 1  # the buffer is smaller than storing every state


def test_baseline_logs_only_the_measurement(runs: dict[str, Any]) -> None:
    trainer, report, _model, _ = runs["gru"]
    assert _memory_keys(trainer.callback_metrics) == MEASURED_KEYS
    assert _memory_keys(trainer.logged_metrics) == MEASURED_KEYS
    assert all(set(row) == {"step", "world_size", "micro_batches"} | MEASURED_KEYS for row in report.history)


def test_reversible_step_memory_is_far_below_the_baseline(runs: dict[str, Any]) -> None:
    rev, base = runs["revgru"][1].history, runs["gru"][1].history
    assert len(rev) == len(base) == STEPS
    logits_bytes = BPTT * 8 * VOCAB * 4  # T · B · vocab float32: the baseline keeps its logits for backward
    r, b = [row[PREFIX + "saved_bytes"] for row in rev], [row[PREFIX + "saved_bytes"] for row in base]
    assert min(b) >= logits_bytes and max(r) < logits_bytes / 5, (r, b)
    # The peak: the reverse sweep works on CHUNK-step chunks (each chunk's states and gates, head logits), so
    # its peak stays flat while the baseline's grows with T (see the README's measurements); at T 64 (eight
    # chunks) it is below the baseline's even for this tiny model.
    r, b = [row[PREFIX + "peak_excl_grad_bytes"] for row in rev], [row[PREFIX + "peak_excl_grad_bytes"] for row in base]
    assert max(r) < min(b), (r, b)
    assert all(row[PREFIX + "peak_bytes"] >= row[PREFIX + "grad_bytes"] > 0 for row in rev + base)


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
    assert [row["step"] for row in data["steps"]] == [1.0, 2.0, 3.0] and trainer.global_step == STEPS
    assert data["steps"] == report.history
    assert data["summary"] == pytest.approx(report.summary())
    assert ("memory/actual_ratio" in data["summary"]) == (rnn == "revgru")
    median = sorted(row["memory/peak_bytes"] for row in data["steps"])[1]
    assert data["summary"]["memory/peak_bytes"] == pytest.approx(median)


def test_metrics_reach_the_csv_logger(runs: dict[str, Any]) -> None:
    trainer, *_ = runs["revgru"]
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    values = [float(r["memory/peak_bytes"]) for r in rows if r.get("memory/peak_bytes")]
    assert len(values) == STEPS and all(v > 0 for v in values)
    ratios = [float(r["memory/rnn/layer1/actual_ratio"]) for r in rows if r.get("memory/rnn/layer1/actual_ratio")]
    assert len(ratios) == STEPS and all(math.isfinite(r) and r > 1 for r in ratios)


def test_figure_has_legend_zero_axes_reference_line_and_one_point_per_step(runs: dict[str, Any]) -> None:
    report = runs["revgru"][1]
    fig = report.figure()
    try:
        assert len(fig.axes) == 2
        for ax in fig.axes:
            assert ax.get_legend() is not None
            assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
            assert all(len(line.get_xdata()) == STEPS for line in ax.get_lines())
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        normal = lines["non-reversible hidden states (normal bits)"]
        expected = report.history[-1]["memory/normal_bits"] / 8 / 2**20
        assert normal.get_ydata()[-1] == pytest.approx(expected)
        assert lines["reversible buffers (used bits)"].get_ydata()[-1] < normal.get_ydata()[-1]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_printed_summary_says_which_model_it_measured(runs: dict[str, Any]) -> None:
    for rnn, described in (("revgru", "LanguageModel (rnn: RevGRU)"), ("gru", "LanguageModel (no reversible module)")):
        trainer, report, model, _root = runs[rnn]
        text = report.summary_text(model, trainer.log_dir)
        assert text.splitlines()[0] == (
            f"MemoryReport of {described}, median over {STEPS} measured steps; written to {trainer.log_dir}"
        )
        assert "  peak_excl_grad_bytes" in text


def test_plot_can_be_disabled(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        callbacks=[MemoryReport(every_n_steps=1, plot=False)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_lm("revgru", num_layers=1), _data(batch_size=4, bptt=10))
    # no logger: the report goes to default_root_dir
    assert (tmp_path / "memory_report.json").is_file()
    assert not (tmp_path / "memory_report.png").exists()


def test_every_n_steps_and_gradient_accumulation_give_one_point_per_optimizer_step(tmp_path: Path) -> None:
    report = MemoryReport(every_n_steps=2)
    trainer = _trainer(tmp_path, report, limit_train_batches=8, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(_lm("revgru", num_layers=1), _data(batch_size=4, bptt=10))
    assert trainer.global_step == 4
    assert [row["step"] for row in report.history] == [2.0, 4.0]  # optimizer steps, not micro-batches
    for row in report.history:
        assert row["micro_batches"] == 2 and row["memory/windows"] == 2
        assert row["memory/normal_bits"] == 2 * 32 * 10 * 4 * 16  # two windows of T · B · H · 32 bits
        assert row["memory/peak_excl_grad_bytes"] > 0 and row["memory/saved_bytes"] > 0


def test_default_period_follows_log_every_n_steps(tmp_path: Path) -> None:
    report = MemoryReport()
    trainer = _trainer(tmp_path, report, limit_train_batches=4, limit_val_batches=0, log_every_n_steps=3)
    trainer.fit(_lm("gru", num_layers=1), _data(batch_size=4, bptt=10))
    assert [row["step"] for row in report.history] == [3.0]
    assert float(trainer.logged_metrics["memory/peak_bytes"]) == report.history[0]["memory/peak_bytes"]


def test_every_n_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryReport(every_n_steps=0)


# --------------------------------------------------------------------- a user's own LightningModule
class Tagger(pl.LightningModule):
    """A user's module: a RevLSTM nested in a container, run on two windows per step (truncated BPTT by
    hand, state carried detached), batches sliced from a corpus tensor that the module owns."""

    corpus: Tensor  # a registered buffer

    def __init__(self, corpus_rows: int = 10_000, features: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"encoder": RevLSTM(features, hidden)})
        self.readout = nn.Linear(hidden, 1)
        self.register_buffer("corpus", torch.randn(corpus_rows, 4, features))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        window = self.corpus[20 * batch_idx : 20 * batch_idx + 20]  # (20, 4, 8): a view of the corpus
        rnn = self.blocks["encoder"]
        out1, (h, c) = rnn(window[:10])
        out2, _ = rnn(window[10:], (h.detach(), c.detach()))
        return self.readout(torch.cat([out1, out2]).float()).square().mean()

    def train_dataloader(self) -> Any:
        # a tensor is a map-style dataset by duck typing (__getitem__, __len__); DataLoader's type asks for Dataset
        return torch.utils.data.DataLoader(cast("Dataset[Tensor]", torch.zeros(4, 1)), batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_any_lightning_module_gets_per_module_accounting(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, report = Tagger(), MemoryReport(every_n_steps=1)
    trainer = _trainer(tmp_path, report, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model)
    assert not hasattr(model, "memory_stats")
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    name = "memory/blocks.encoder/"
    assert m[name + "windows"] == m["memory/windows"] == 2
    per_window = 2 * 32 * 10 * 4 * 16  # h and c: 2 · 32 bits · T 10 · B 4 · H 16
    assert m[name + "normal_bits"] == m["memory/normal_bits"] == 2 * per_window
    assert m[name + "layer0/normal_bits"] == 2 * per_window
    assert 0 < m[name + "used_bits"] < m[name + "normal_bits"]
    # the corpus (10k × 4 × 8 float32 = 1.28 MB) existed before the step: a saved slice of it costs nothing
    corpus_bytes = model.corpus.untyped_storage().nbytes()
    assert 0 < m["memory/saved_bytes"] < corpus_bytes / 20
    assert 0 < m["memory/peak_excl_grad_bytes"] < corpus_bytes / 10


# ------------------------------------------------------------------------------------- reduction
class _RecordingStrategy:
    """Stands in for a 2-rank strategy: rank values are (value, 3·value); records the reduce ops."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    def reduce(self, t: Tensor, reduce_op: str) -> Tensor:
        self.ops.append(reduce_op)
        both = torch.stack([t, 3 * t])
        return both.max(0).values if reduce_op == "max" else both.sum(0)


def test_peaks_reduced_by_max_and_bits_by_sum() -> None:
    from lightning_revrnn.memory import StepMemory

    report = MemoryReport(every_n_steps=1)
    module = RevLSTM(4, 6, num_layers=2)
    report._modules = [("enc", module)]
    module.train()
    module(torch.randn(5, 3, 4, requires_grad=True))
    report._windows = {"enc": [module.memory_stats()]}
    trainer: Any = type("T", (), {"strategy": _RecordingStrategy()})()
    measured = report._reduce_measured(trainer, StepMemory(10, 2, 8, 5, 1), torch.device("cpu"))
    assert measured == {
        "memory/peak_bytes": 30,
        "memory/grad_bytes": 6,
        "memory/peak_excl_grad_bytes": 24,
        "memory/saved_bytes": 15,
    }
    accounting = report._reduce_accounting(trainer, torch.device("cpu"))
    assert trainer.strategy.ops == ["max", "sum"]
    stats = module.memory_stats()
    assert accounting["memory/normal_bits"] == accounting["memory/enc/normal_bits"] == 4 * stats.normal_bits
    assert accounting["memory/enc/layer1/used_bits"] == 4 * stats.layers[1].used_bits
    assert accounting["memory/windows"] == 4
    assert accounting["memory/actual_ratio"] == pytest.approx(stats.actual_ratio)


# ------------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_trace_peak_is_the_allocators_and_gradients_split() -> None:
    from lightning_revrnn.memory import MemoryTrace

    device = torch.device("cuda")
    lin = nn.Linear(256, 512).to(device)
    x = torch.randn(128, 256, device=device)
    trace = MemoryTrace(device)
    trace.start()
    trace.begin_forward()
    out = torch.tanh(lin(x))
    trace.end_forward()
    out.sum().backward()
    measured = trace.stop(lin.parameters())
    # the caching allocator rounds blocks to 512 bytes; these sizes are multiples of 512
    assert measured.saved_bytes == 128 * 512 * 4
    assert measured.grad_bytes == (256 * 512 + 512) * 4
    assert measured.peak_excl_grad_bytes >= 2 * 128 * 512 * 4
    assert measured.peak_excl_grad_bytes < measured.peak_bytes


@cuda
def test_cuda_trainer_run(tmp_path: Path) -> None:
    report = MemoryReport(every_n_steps=1)
    trainer = _trainer(tmp_path, report, accelerator="gpu", limit_val_batches=0)
    trainer.fit(_lm("revgru"), _data())
    assert len(report.history) == STEPS
    for row in report.history:
        assert row["memory/peak_bytes"] >= row["memory/peak_excl_grad_bytes"] > 0
        assert 0 < row["memory/saved_bytes"] < row["memory/peak_bytes"]
        assert row["memory/normal_bits"] == 32 * BPTT * 8 * (24 + 16)


def test_report_dir_says_where_the_report_went(tmp_path: Path) -> None:
    """Default: the fit's log directory; ``dirpath``: that folder (created), recorded in ``report_dir``."""
    from pytorch_lightning.loggers import CSVLogger

    from lightning_revrnn.callbacks import MemoryReport
    from lightning_revrnn.datamodules import SyntheticLMDataModule
    from lightning_revrnn.lm import LanguageModel

    for dirpath in (None, tmp_path / "chosen" / "folder"):
        torch.manual_seed(0)
        model = LanguageModel(16, rnn="revgru", emb_size=8, hidden_size=8)
        data = SyntheticLMDataModule(
            vocab_size=16, train_tokens=400, val_tokens=100, test_tokens=100, batch_size=2, eval_batch_size=2, bptt=10
        )
        report = MemoryReport(every_n_steps=1, plot=False, dirpath=dirpath)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=1,
            limit_val_batches=0,
            logger=CSVLogger(str(tmp_path)),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[report],
        )
        trainer.fit(model, data)
        expected = str(dirpath) if dirpath is not None else trainer.log_dir
        assert report.report_dir == expected and report.dirpath == (None if dirpath is None else str(dirpath))
        assert (Path(str(expected)) / "memory_report.json").is_file()
