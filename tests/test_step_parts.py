"""benchmarks/step_parts.py times what it documents: disjoint parts of one step, for both models."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from lightning_revrnn.core import sweep as sweep_module
from lightning_revrnn.core.backend import Backend
from lightning_revrnn.core.window import WindowPlan
from lightning_revrnn.shared import BaselineRNN

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    """benchmarks/ is not a package: its scripts import their siblings by name from their own folder."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


step_parts = _load("step_parts")
SIZES = dict(layers=1, seq_len=6, batch=2, vocab=50, emb=8, hidden=8)


def _step(variant: str, cell: str) -> tuple[dict[str, float], Any]:
    config = step_parts.Config(cell=cell, **SIZES, **({"variant": "rev", "bits": 3} if variant == "rev" else {}))
    model = step_parts.build_model(config, torch.device("cpu"))
    clock = step_parts.PartClock()
    with step_parts.instrumented(clock):
        parts = step_parts.timed_step(model, step_parts.make_batch(config, torch.device("cpu")), clock)
    return parts, clock


def test_baseline_parts_cover_forward_and_backward_without_overlap() -> None:
    for cell in ("gru", "lstm"):
        parts, clock = _step("plain", cell)
        assert set(clock.marks) == {"rnn_input", "rnn_output"}  # backward reached both ends of the RNN
        assert clock.marks["rnn_output"] <= clock.marks["rnn_input"]  # the head's backward comes first
        assert parts["recurrence"] > 0 and parts["head"] > 0
        assert parts["rest"] >= 0  # parts overlapping (a call timed twice) would exceed the whole step
        assert abs(sum(parts[p] for p in step_parts.PARTS) - parts["step"]) < 1e-6


def test_reversible_parts_are_timed_inside_the_sweep_without_overlap() -> None:
    for cell in ("gru", "lstm"):
        parts, clock = _step("rev", cell)
        assert clock.marks == {}  # the reversible model has no BaselineRNN
        assert parts["recurrence"] > 0 and parts["head"] > 0
        assert parts["rest"] >= 0


def _wrapped_callables() -> list[object]:
    """What :func:`step_parts.instrumented` replaces, as found now."""
    return [
        Backend.forward_step,
        WindowPlan.projection,
        WindowPlan.head_value,
        sweep_module.reconstruct_chunk,
        sweep_module.backprop_chunk,
        sweep_module.head_gradient,
        BaselineRNN.forward,
    ]


def test_instrumentation_puts_the_originals_back() -> None:
    originals = _wrapped_callables()
    with step_parts.instrumented(step_parts.PartClock()):
        assert not any(a is b for a, b in zip(originals, _wrapped_callables()))
    assert all(a is b for a, b in zip(originals, _wrapped_callables()))


def test_main_writes_shares_of_the_excess(tmp_path: Path) -> None:
    out = tmp_path / "parts.json"
    groups = step_parts.main(["--small", "--cells", "lstm", "--seq-lens", "6", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert [g["cell"] for g in written["groups"]] == ["lstm"] and len(groups) == 1
    group = written["groups"][0]
    shares = group["share_of_excess"]
    if all(s is not None for s in shares.values()):
        assert abs(sum(shares.values()) - 1.0) < 1e-9
    base, rev = group["baseline_ms"], group["reversible_ms"]
    assert group["time_ratio"] == rev["step"] / base["step"]
