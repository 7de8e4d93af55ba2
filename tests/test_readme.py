"""The README's code blocks run as written: a newcomer's first copy-paste must work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(containing: str) -> str:
    """The README's ```python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matches = [b for b in blocks if containing in b]
    assert len(matches) == 1, f"expected one README python block with {containing!r}, found {len(matches)}"
    return matches[0]


def test_user_lightning_module_with_revlstm_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own truncated-BPTT LightningModule (nn.LSTM swapped for RevLSTM) fits with MemoryReport."""
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(python_block("class MyLM"), "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    trainer = scope["trainer"]
    assert trainer.state.finished and trainer.global_step == 20  # type: ignore[attr-defined]
    model = scope["model"]
    assert model.state[0].dtype == model.out.weight.dtype  # type: ignore[attr-defined]  # h_n feeds float32 layers


def test_api_block_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The API section's example (sizes shrunk so it runs in a second)."""
    monkeypatch.chdir(tmp_path)
    code = python_block("rnn = RevGRU(").replace("650", "64").replace("1150", "96").replace("70, 20", "20, 4")
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102
