"""The main job (``make demo``) runs end to end and prints its tables, readably (few steps here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightning_revrnn import demo

#: What must never reach the demo's output, nor its training log: progress bars and the profiler's lines.
NOISE = re.compile(r"it/s\]|\d+%\||Epoch \d+:|Training:|Testing|Validation|USDT|profiler_st")
ARGS = ["--steps", "4", "--train-tokens", "4000", "--nmt-steps", "3", "--nmt-train", "300"]
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl.*"),  # validated after fit
]


def test_demo_prints_the_tables_and_writes_json(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    demo.main([*ARGS, "--out", str(tmp_path)])
    captured = capfd.readouterr()  # the file descriptors too: C++ (the profiler) writes to fd 2
    printed = captured.out
    assert not NOISE.search(captured.out + captured.err), (captured.out + captured.err)[:2000]
    assert captured.err == ""  # training's messages go to train.log
    # one line per model as it trains, then one table per task; every row names its model
    for name in ("RevGRU LM, 3 bits", "GRU LM (nn.GRU)", "RevGRU Emb+8H, 3 bits", "GRU 64H (nn.GRU)"):
        assert len(re.findall(re.escape(name), printed)) == 2, name
    lm, nmt = printed.split("\nLanguage modelling")[1].split("\nTranslation with attention")
    assert "val ppl" in lm and "saved KiB" in lm and "RevGRU LM" in lm and "Emb+8H" not in lm
    assert "test BLEU" in nmt and "RevGRU Emb+8H" in nmt and "GRU LM" not in nmt
    assert "the same on every run" in printed

    log = (tmp_path / "train.log").read_text()
    assert not NOISE.search(log), log[:2000]  # silenced at the source, not only kept off the console
    assert "MemoryReport of TranslationModel (encoder: " in log  # the summaries say which model they describe

    result = json.loads((tmp_path / "demo.json").read_text())
    rows = result["lm"]
    assert [r["rnn"] for r in rows] == ["revgru", "gru"]
    reversible, baseline = rows
    assert reversible["steps"] == baseline["steps"] == 4
    assert reversible["saved_bytes"] < baseline["saved_bytes"]  # the point of the demo
    assert reversible["used_bits"] > 0 and "used_bits" not in baseline
    translation = result["translation"]
    assert [r["rnn"] for r in translation] == ["revgru", "gru"]
    assert all(r["steps"] == 3 and 0.0 <= r["test_bleu"] <= 100.0 for r in translation)
    assert translation[0]["saved_bytes"] < translation[1]["saved_bytes"]
    assert translation[0]["encoder/stored_bits"] > 0 and translation[0]["decoder/actual_ratio"] > 1


def test_memory_figures_are_the_same_on_every_run(tmp_path: Path) -> None:
    """The translation step's peak printed 1658.7 KiB in one run and 1684.6 in the next (frees of blocks from
    earlier traces at reused addresses were counted); two runs now measure the same bytes."""
    args = ["--steps", "20", "--train-tokens", "4000", "--nmt-steps", "3", "--nmt-train", "300"]
    runs = []
    for i in range(2):
        demo.main([*args, "--out", str(tmp_path / str(i))])
        result = json.loads((tmp_path / str(i) / "demo.json").read_text())
        runs.append(
            [
                [row[k] for k in ("peak_bytes", "peak_excl_grad_bytes", "saved_bytes", "grad_bytes")]
                for row in result["lm"] + result["translation"]
            ]
        )
    assert runs[0] == runs[1]
