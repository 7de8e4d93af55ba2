"""The main job (``make demo``) runs end to end and prints its table (few steps here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_revrnn import demo


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_prints_the_table_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo.main(["--steps", "4", "--train-tokens", "4000", "--nmt-steps", "3", "--nmt-train", "300",
               "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "revgru" in printed and "gru" in printed and "saved KiB" in printed and "test BLEU" in printed
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
