"""Where the reversible LM step's time goes, part by part, beside the nn.* LM's same parts.

The LM step of :mod:`lm_step` (same models, sizes, batch and step: ``training_step`` then ``backward()``), with
every step split into three parts, in this one process, the two models' steps in turns (``--repeats``
rounds, medians):

* **recurrence**: the baseline's ``BaselineRNN`` forward (input dropout, DropConnect, ``nn.LSTM``/``nn.GRU``)
  and its backward (from the gradient of its output to that of its input, timed by tensor hooks); the
  reversible model's forward steps and input projections, and in the reverse sweep the reconstruction
  (:func:`~lightning_revrnn.core.sweep.reconstruct_chunk`) and the backpropagation
  (:func:`~lightning_revrnn.core.sweep.backprop_chunk`) of every chunk;
* **head**: the decoder and cross-entropy, forward and backward (the baseline's ``head(out)`` and its backward
  up to the output's gradient; the reversible model's per-chunk value in forward and
  :func:`~lightning_revrnn.core.sweep.head_gradient` in the sweep: a logits GEMM more than the baseline, on
  ``chunk × batch`` rows at a time);
* **rest**: the step's time outside both (embedding and its dropout, the stem's gradients, the reversible
  model's buffer packing, checksums and bookkeeping).

The CPU runs synchronously, so host timestamps delimit the parts. Each part's "excess" is the reversible time
minus the baseline's (medians); "share" is that excess over the parts' excesses added up: which part to make
faster. The timers add
one ``perf_counter`` pair per wrapped call (under a microsecond; about 100 calls per chunk).

Usage::

    python benchmarks/step_parts.py                        # RevGRU and RevLSTM, T 70 and 1000
    python benchmarks/step_parts.py --seq-lens 70 --threads 1
    python benchmarks/step_parts.py --small                # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_revrnn.core import sweep as sweep_module
from lightning_revrnn.core.backend import Backend
from lightning_revrnn.core.window import WindowPlan
from lightning_revrnn.lm.head import BoundDecoderHead
from lightning_revrnn.lm.model import LanguageModel
from lightning_revrnn.shared import BaselineRNN

if __package__:  # python -m benchmarks.step_parts: the siblings import each other by their own names
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_step import Config, backward_and_clear, build_model, make_batch

PARTS = ("recurrence", "head", "rest")
PAPER = dict(batch=20, vocab=10000, emb=650, hidden=1150, seq_lens=[70, 1000], repeats=5)
SMALL = dict(batch=4, vocab=200, emb=32, hidden=48, seq_lens=[12], repeats=2)


class PartClock:
    """Seconds per part of one step, from wrapped calls (forward, sweep) and backward hooks (baseline)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}

    def timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its wall time added to ``part``."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return wrapper

    def mark_on_grad(self, tensor: Tensor, name: str) -> None:
        """Record when backward reaches ``tensor``'s gradient (its first arrival)."""
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: self.marks.setdefault(name, time.perf_counter()) and None)


@contextmanager
def instrumented(clock: PartClock) -> Iterator[None]:
    """Wrap the reversible sweep's parts and the baseline's RNN with ``clock``'s timers; restore them after."""
    patches: list[tuple[Any, str, Any]] = [
        (Backend, "forward_step", clock.timed("recurrence", Backend.forward_step)),
        (WindowPlan, "projection", clock.timed("recurrence", WindowPlan.projection)),
        (WindowPlan, "head_value", clock.timed("head", WindowPlan.head_value)),
        (sweep_module, "reconstruct_chunk", clock.timed("recurrence", sweep_module.reconstruct_chunk)),
        (sweep_module, "backprop_chunk", clock.timed("recurrence", sweep_module.backprop_chunk)),
        (sweep_module, "head_gradient", clock.timed("head", sweep_module.head_gradient)),
    ]
    baseline_forward = BaselineRNN.forward

    def baseline_rnn(self: BaselineRNN, x: Tensor, hx: list[Any] | None = None) -> tuple[Tensor, list[Any]]:
        clock.mark_on_grad(x, "rnn_input")
        out, finals = clock.timed("recurrence", baseline_forward)(self, x, hx)
        clock.mark_on_grad(out, "rnn_output")
        return out, finals

    patches.append((BaselineRNN, "forward", baseline_rnn))
    originals = [(owner, name, vars(owner)[name]) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def timed_step(model: LanguageModel, batch: dict[str, Any], clock: PartClock) -> dict[str, float]:
    """One step, in milliseconds per part and ``step`` (the whole). The baseline's head forward is the
    forward's time outside the RNN and the embedding; its backward parts come from the hooks' marks."""
    clock.seconds.clear()
    clock.marks.clear()
    start = time.perf_counter()
    if model.reversible:
        loss = model.training_step(batch, 0)
    else:  # the baseline's head forward (in the reversible model it runs inside head_value, timed already)
        head_forward = BoundDecoderHead.forward
        BoundDecoderHead.forward = clock.timed("head", head_forward)  # type: ignore[method-assign]
        try:
            loss = model.training_step(batch, 0)
        finally:
            BoundDecoderHead.forward = head_forward  # type: ignore[method-assign]
    backward_start = time.perf_counter()
    backward_and_clear(model, loss)
    end = time.perf_counter()
    parts = dict(clock.seconds)
    if not model.reversible:  # backward: head until the RNN output's gradient, RNN until its input's
        out_mark = clock.marks.get("rnn_output", backward_start)
        parts["head"] = parts.get("head", 0.0) + out_mark - backward_start
        parts["recurrence"] = parts.get("recurrence", 0.0) + clock.marks.get("rnn_input", out_mark) - out_mark
    result = {p: parts.get(p, 0.0) * 1e3 for p in PARTS[:2]}
    result["step"] = (end - start) * 1e3
    result["rest"] = result["step"] - result["recurrence"] - result["head"]
    return result


def measure_group(cell: str, seq_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """The baseline's and the reversible model's steps in turns: medians per part, excess and shares."""
    sizes = dict(layers=1, seq_len=seq_len, batch=args.batch, vocab=args.vocab, emb=args.emb, hidden=args.hidden)
    configs = {
        "baseline": Config(cell=cell, **sizes),
        "reversible": Config(cell=cell, **sizes, variant="rev", bits=3),
    }
    device = torch.device("cpu")
    models = {k: (build_model(c, device), make_batch(c, device)) for k, c in configs.items()}
    clock = PartClock()
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    with instrumented(clock):
        for model, batch in models.values():  # warm-up
            timed_step(model, batch, clock)
        for _ in range(args.repeats):
            for name, (model, batch) in models.items():
                samples[name].append(timed_step(model, batch, clock))
    medians = {
        name: {p: statistics.median(s[p] for s in runs) for p in (*PARTS, "step")} for name, runs in samples.items()
    }
    base, rev = medians["baseline"], medians["reversible"]
    # the parts' medians need not add up to the step's median: shares are of the parts' excesses added up
    excess = sum(rev[p] - base[p] for p in PARTS)
    return {
        "cell": cell,
        "seq_len": seq_len,
        "baseline_ms": base,
        "reversible_ms": rev,
        "time_ratio": rev["step"] / base["step"],
        "share_of_excess": {p: (rev[p] - base[p]) / excess if excess else None for p in PARTS},
        "samples_ms": samples,
    }


def format_table(groups: Sequence[dict[str, Any]]) -> str:
    """One line per (cell, T, part): baseline ms, reversible ms, ratio, excess ms and its share."""
    lines = [f"{'cell':5} {'T':>5} {'part':11} {'nn.* ms':>9} {'rev ms':>9} {'ratio':>6} {'excess':>8} {'share':>6}"]
    for g in groups:
        for part in (*PARTS, "step"):
            b, r = g["baseline_ms"][part], g["reversible_ms"][part]
            share = g["share_of_excess"].get(part)
            ratio = f"{r / b:6.2f}" if b > 0 else f"{'-':>6}"
            share_text = f"{share:6.0%}" if share is not None else f"{'-':>6}"
            lines.append(
                f"{g['cell']:5} {g['seq_len']:5d} {part:11} {b:9.1f} {r:9.1f} {ratio} {r - b:8.1f} {share_text}"
            )
    return "\n".join(lines)


def add_common_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """The options this script shares with :mod:`gemm_floor` (``name``: the results file's stem)."""
    p.add_argument("--cells", nargs="+", choices=["gru", "lstm"], default=["gru", "lstm"])
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths T (default 70 1000)")
    p.add_argument("--repeats", type=int, help="timed rounds after one warm-up (default 5)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--small", action="store_true", help="smoke preset: vocab 200, emb 32, T 12, batch 4")
    p.add_argument("--out", type=Path, help=f"JSON path (default benchmarks/results/{name}-cpu[-small].json)")


def finish_arguments(p: argparse.ArgumentParser, argv: Sequence[str] | None, name: str) -> argparse.Namespace:
    """Parse, fill what was not given from :data:`PAPER` or :data:`SMALL`, check, and name the default JSON path."""
    args = p.parse_args(argv)
    for key, value in (SMALL if args.small else PAPER).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.repeats < 1 or min(args.seq_lens) < 1:
        p.error("--repeats and --seq-lens must be positive")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.out is None:
        suffix = "-small" if args.small else ""
        args.out = Path(__file__).resolve().parent / "results" / f"{name}-cpu{suffix}.json"
    return args


def report(args: argparse.Namespace, groups: list[dict[str, Any]], table: str) -> None:
    """Print the table under the setting's line and write the groups' JSON to ``args.out``."""
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, {args.repeats} rounds (medians)")
    print(table)
    payload = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "groups": groups,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measure every (cell, T), print the table, write the JSON; returns the groups."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, "step_parts")
    args = finish_arguments(p, argv, "step_parts")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    groups = [measure_group(cell, t, args) for t in args.seq_lens for cell in args.cells]
    report(args, groups, format_table(groups))
    return groups


if __name__ == "__main__":
    main()
