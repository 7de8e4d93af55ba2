"""Benchmark forward+backward of RevGRU / RevLSTM against the ``nn.GRU`` / ``nn.LSTM`` baselines.

Every configuration runs in this one process, side by side: the baseline (cuDNN on CUDA, ATen on CPU)
and the reversible module in both training modes (``"reverse"``: reconstruct states in backward;
``"store"``: ordinary autograd through the same fixed-point forward) for each ``max_forget_bits``.

One *step* is: forward, ``out.sum().backward()``, gradients set to None. Per configuration:

1. a warm-up step, its forward wrapped in :func:`saved_tensor_bytes` (bytes the step allocated and autograd
   holds for backward: the "excl. input" figure; "incl." adds the bytes of the input ``x``, which every
   model here saves); the reversible module's ``memory_stats()`` is read right after this forward;
2. on CUDA, one step measured with the allocator: ``max_memory_allocated() - memory_allocated()`` at its
   start (``x`` is allocated before, so this is an "excl. input" figure; "incl." adds ``x``'s bytes);
3. ``--repeats`` timed steps, no hooks; the reported time is their median (``--interleave``: one step of
   each configuration of a group in turn, ``--repeats`` rounds);
4. the step's op and host-sync counts (:mod:`opcount`, after the timing, so its overhead is not timed):
   one step at T and one at ``--count-short-t`` (16: one chunk) on the first steps of the same input.
   Per step per layer: non-view ATen ops in the forward (inside the module call) and in the reverse sweep
   (inside ``backward()``), each divided by T × layers (per-window constants spread over the window), and
   their slope between the two lengths (``Δ``: what one more step of one layer adds, free of per-window
   constants); syncs per window in forward and backward at both lengths (equal: none per step). The
   issue's targets are printed beside them: ≤ 20 forward and ≤ 40 reverse ops per step per layer, ≤ 2
   syncs per window, none per step; a footer checks them for every ``mode="reverse"`` row.

On CPU the memory columns are the saved-tensor bytes; on CUDA they are the allocator peak (the
saved-tensor bytes are still recorded in the JSON). The memory ratio is baseline bytes / reversible
bytes (higher is better for the reversible model), the time ratio reversible time / baseline time.

Usage::

    python benchmarks/rnn.py                 # the paper's sizes (long on CPU)
    python benchmarks/rnn.py --small         # smoke run, well under a minute on 2 cores
    python benchmarks/rnn.py --seq-lens 70 --layers 1 --bits 3 --repeats 1
    python benchmarks/rnn.py --no-count      # timing and memory only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_revrnn import ReversibleRNN, RevGRU, RevLSTM
from lightning_revrnn.memory import saved_tensor_bytes

# Siblings are imported by their own names: run as a script, benchmarks/ is already sys.path[0]; run as
# ``python -m benchmarks.rnn`` (or imported), this puts it there. The imports below rely on it.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from opcount import StepCounts, count_step, marginal_per_step_layer

#: Sizes of the paper's experiments, used unless ``--small`` or an explicit flag overrides them.
PAPER_PRESET: dict[str, Any] = {
    "seq_lens": [70, 1000],
    "layers": [1, 2],
    "batch": 20,
    "input_size": 650,
    "hidden": 650,
    "repeats": 3,
}
#: A quick smoke-test preset.
SMALL_PRESET: dict[str, Any] = {
    "seq_lens": [20, 100],
    "layers": [1],
    "batch": 4,
    "input_size": 64,
    "hidden": 64,
    "repeats": 1,
}
#: Reversible class and baseline class per ``--cells`` name.
CELLS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {"gru": (RevGRU, nn.GRU), "lstm": (RevLSTM, nn.LSTM)}
#: ``max_forget_bits`` values the library accepts.
BITS_CHOICES = (1, 2, 3, 5, None)
#: Keys copied from ``memory_stats()`` into a row.
STAT_KEYS = (
    "normal_bits",
    "used_bits",
    "optimal_bits",
    "actual_ratio",
    "optimal_ratio",
    "efficiency",
    "drains",
    "multiplications",
)
MB = 1e6
#: The issue's targets for the default path, per step per layer: non-view ATen ops in forward and reverse.
OP_TARGETS: dict[str, float] = {"forward": 20.0, "reverse": 40.0}
#: The issue's target: host syncs per window, in forward and in backward each (and none per step).
SYNC_TARGET = 2


# ---------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """One measured configuration. ``mode`` and ``bits`` are None for the baseline."""

    cell: str
    layers: int
    seq_len: int
    batch: int
    input_size: int
    hidden: int
    mode: str | None = None
    bits: int | None = None

    @property
    def is_baseline(self) -> bool:
        """True for the ``nn.GRU`` / ``nn.LSTM`` row."""
        return self.mode is None

    @property
    def group(self) -> tuple[str, int, int]:
        """Rows sharing this key are compared with the same baseline."""
        return (self.cell, self.layers, self.seq_len)

    def label(self) -> str:
        """Short human-readable name for progress messages."""
        what = "baseline" if self.is_baseline else f"{self.mode} k={fmt_bits(self.bits)}"
        return f"{self.cell} L={self.layers} T={self.seq_len} {what}"


@dataclass
class Row:
    """Measurements of one configuration (one table row, one JSON object)."""

    config: Config
    model: str
    #: ``type(out.grad_fn).__name__``: shows which kernel ran (e.g. ``MkldnnRnnLayerBackward0``: fused oneDNN).
    grad_fn: str | None = None
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    input_bytes: int = 0
    saved_bytes_incl_input: int | None = None
    saved_bytes_excl_input: int | None = None
    cuda_peak_bytes_excl_input: int | None = None
    stats: dict[str, Any] | None = None
    error: str | None = None
    time_ratio: float | None = None
    mem_ratio_incl_input: float | None = None
    mem_ratio_excl_input: float | None = None
    #: Op and sync counts of one step at T and at the short length (:meth:`opcount.StepCounts.to_json`).
    counts: dict[str, Any] | None = None
    counts_short: dict[str, Any] | None = None
    #: (forward, reverse) ops one more step of one layer adds: the slope between the short length and T.
    marginal_ops: tuple[float, float] | None = None

    def ops_per_step_layer(self, phase: str, short: bool = False) -> float | None:
        """Ops per step per layer of ``phase`` (``forward``/``reverse``) at T, or at the short length."""
        counts = self.counts_short if short else self.counts
        return None if counts is None else counts[f"{phase}_ops_per_step_layer"]

    def syncs_per_window(self, short: bool = False) -> tuple[int, int] | None:
        """(forward, backward) host syncs per window at T, or at the short length."""
        counts = self.counts_short if short else self.counts
        return None if counts is None else (counts["forward_syncs_per_window"], counts["reverse_syncs_per_window"])

    def memory_bytes(self, include_input: bool) -> int | None:
        """The device's memory figure: allocator peak on CUDA, saved-tensor bytes on CPU."""
        if self.cuda_peak_bytes_excl_input is not None:
            peak = self.cuda_peak_bytes_excl_input
            return peak + self.input_bytes if include_input else peak
        return self.saved_bytes_incl_input if include_input else self.saved_bytes_excl_input

    def to_json(self) -> dict[str, Any]:
        """Flat JSON-serialisable mapping."""
        d = asdict(self)
        config = d.pop("config")
        return {
            **config,
            "baseline": self.config.is_baseline,
            **d,
            "memory_bytes_incl_input": self.memory_bytes(True),
            "memory_bytes_excl_input": self.memory_bytes(False),
        }


def fmt_bits(bits: int | None) -> str:
    """``max_forget_bits`` as written on the command line."""
    return "none" if bits is None else str(bits)


def parse_bits(text: str) -> int | None:
    """argparse type for ``--bits``: an allowed integer or ``none``."""
    value = None if text.lower() == "none" else int(text)
    if value not in BITS_CHOICES:
        raise argparse.ArgumentTypeError(f"bits must be one of {', '.join(map(fmt_bits, BITS_CHOICES))}, got {text!r}")
    return value


def build_configs(args: argparse.Namespace) -> list[Config]:
    """All configurations, grouped: for each (cell, layers, T), the baseline first, then mode × bits."""
    configs: list[Config] = []
    for cell in args.cells:
        for layers in args.layers:
            for seq_len in args.seq_lens:
                base = Config(cell, layers, seq_len, args.batch, args.input_size, args.hidden)
                configs.append(base)
                configs += [
                    Config(cell, layers, seq_len, args.batch, args.input_size, args.hidden, mode, bits)
                    for mode in args.modes
                    for bits in args.bits
                ]
    return configs


# ------------------------------------------------------------------------------------------- measuring
def build_model(config: Config, device: torch.device) -> nn.Module:
    """A fresh module seeded with ``torch.manual_seed(0)`` (same weights for every mode of a config)."""
    rev_class, base_class = CELLS[config.cell]
    torch.manual_seed(0)
    if config.is_baseline:
        model = base_class(config.input_size, config.hidden, num_layers=config.layers)
    else:
        model = rev_class(
            config.input_size,
            config.hidden,
            num_layers=config.layers,
            max_forget_bits=config.bits,
            mode=config.mode,
        )
    return model.to(device).train()


def make_input(config: Config, device: torch.device) -> Tensor:
    """``x`` of shape (T, B, F), the same values for every config of one shape, a leaf requiring grad."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(config.seq_len, config.batch, config.input_size, generator=gen)
    return x.to(device).requires_grad_()


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backward_and_clear(model: nn.Module, x: Tensor, out: Tensor) -> None:
    """The loss ``out.sum()``, its backward, then every gradient set to None."""
    out.sum().backward()
    model.zero_grad(set_to_none=True)
    x.grad = None


def step(model: nn.Module, x: Tensor) -> None:
    """One plain training step: forward, backward, gradients cleared."""
    out, _ = model(x)
    backward_and_clear(model, x, out)


def measure_saved(model: nn.Module, x: Tensor, on_forward: Callable[[Tensor], None] | None = None) -> int:
    """One step whose forward counts the bytes autograd saves that the step allocated (not the parameters,
    not ``x``: :func:`saved_tensor_bytes` counts only storages allocated inside it).

    ``on_forward(out)`` runs right after the forward, before backward (used to read ``memory_stats()``).
    """
    with saved_tensor_bytes(exclude=model.parameters()) as saved:
        out, _ = model(x)
    if on_forward is not None:
        on_forward(out)
    backward_and_clear(model, x, out)
    return saved.total


def measure_cuda_peak(model: nn.Module, x: Tensor, device: torch.device) -> int:
    """Allocator peak of one step above what was allocated at its start (``x`` and the weights)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step(model, x)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - start


def time_steps(model: nn.Module, x: Tensor, device: torch.device, repeats: int) -> list[float]:
    """Wall time of ``repeats`` steps, in milliseconds each."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step(model, x)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def count_ops(model: nn.Module, x: Tensor) -> StepCounts:
    """Op and sync counts of one step (forward, ``out.sum()`` uncounted, backward) on ``x``, gradients
    cleared afterwards."""
    layers = model.num_layers  # RevGRU/RevLSTM and nn.GRU/nn.LSTM all carry it
    assert isinstance(layers, int)
    counts = count_step(lambda: model(x)[0], x.shape[0], layers, to_loss=lambda out: out.sum())
    model.zero_grad(set_to_none=True)
    x.grad = None
    return counts


def measure_counts(model: nn.Module, x: Tensor, short_len: int, row: Row) -> None:
    """Counts at T and at ``short_len`` (the first steps of ``x``, when T is longer), and their slope."""
    full = count_ops(model, x)
    row.counts = full.to_json()
    if x.shape[0] > short_len:
        short = count_ops(model, x[:short_len].detach().requires_grad_())
        row.counts_short = short.to_json()
        row.marginal_ops = marginal_per_step_layer(short, full)


def reversible_stats(model: nn.Module) -> dict[str, Any]:
    """The paper's accounting of the last forward (totals and per layer)."""
    assert isinstance(model, ReversibleRNN)
    stats = model.memory_stats().as_dict()
    return {**{k: stats[k] for k in STAT_KEYS}, "layers": stats["layers"]}


@dataclass
class Subject:
    """One configuration's row, model and input, alive while its steps are timed (in turns with its group's
    other configurations under ``--interleave``). ``model`` is None once the configuration failed."""

    row: Row
    model: nn.Module | None = None
    x: Tensor | None = None

    def fail(self, exc: Exception) -> None:
        """Record the error in the row and drop the model (the other configurations still run)."""
        self.row.error = f"{type(exc).__name__}: {exc}"
        self.model = self.x = None


def prepare(config: Config, device: torch.device) -> Subject:
    """Build the model and input and take the memory measurements (warm-up step; CUDA peak)."""
    model = build_model(config, device)
    row = Row(config=config, model=type(model).__name__)
    x = make_input(config, device)
    row.input_bytes = x.untyped_storage().nbytes()
    subject = Subject(row, model, x)
    try:

        def read_stats(out: Tensor) -> None:
            row.grad_fn = type(out.grad_fn).__name__
            if not config.is_baseline:
                row.stats = reversible_stats(model)

        # x exists before the step, so saved_tensor_bytes never counts it; "incl. input" adds its bytes, as on CUDA.
        row.saved_bytes_excl_input = measure_saved(model, x, on_forward=read_stats)
        row.saved_bytes_incl_input = row.saved_bytes_excl_input + row.input_bytes
        if device.type == "cuda":
            row.cuda_peak_bytes_excl_input = measure_cuda_peak(model, x, device)
    except Exception as exc:
        subject.fail(exc)
    return subject


def time_more(subject: Subject, device: torch.device, repeats: int) -> None:
    """Time ``repeats`` more steps of a prepared configuration."""
    if subject.model is None or subject.x is None:
        return
    try:
        subject.row.times_ms += time_steps(subject.model, subject.x, device, repeats)
    except Exception as exc:
        subject.fail(exc)


def finish(subject: Subject, short_len: int | None) -> Row:
    """The median time, then the op counts (at T and ``short_len``; none when it is None); frees the model."""
    row = subject.row
    if subject.model is not None and subject.x is not None:
        try:
            row.median_ms = statistics.median(row.times_ms)
            if short_len is not None:
                measure_counts(subject.model, subject.x, short_len, row)
        except Exception as exc:
            subject.fail(exc)
    subject.model = subject.x = None
    return row


def measure(config: Config, device: torch.device, repeats: int, short_len: int | None = None) -> Row:
    """All measurements of one configuration; an exception is recorded in the row, not raised. Op counts
    (at T and at ``short_len``) after the timing, unless ``short_len`` is None."""
    subject = prepare(config, device)
    time_more(subject, device, repeats)
    return finish(subject, short_len)


def add_ratios(rows: list[Row]) -> None:
    """Time ratio (rev/baseline) and memory ratios (baseline/rev) against each group's baseline."""
    baselines = {r.config.group: r for r in rows if r.config.is_baseline and r.error is None}
    for row in rows:
        base = baselines.get(row.config.group)
        if base is None or row.error is not None:
            continue
        row.time_ratio = _ratio(row.median_ms, base.median_ms)
        row.mem_ratio_incl_input = _ratio(base.memory_bytes(True), row.memory_bytes(True))
        row.mem_ratio_excl_input = _ratio(base.memory_bytes(False), row.memory_bytes(False))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return float(a) / float(b) if b else float("inf")


def run_all(
    configs: Sequence[Config],
    device: torch.device,
    repeats: int,
    short_len: int | None = None,
    interleave: bool = False,
) -> Iterator[Row]:
    """Measure every configuration in order, reporting progress on stderr. ``interleave``: per (cell,
    layers, T) group, prepare every configuration, then time one step of each in turn, ``repeats`` rounds,
    so a load that changes over minutes (a shared machine) weighs on all of them alike."""
    groups = [[c for c in configs if c.group == g] for g in dict.fromkeys(c.group for c in configs)]
    done = 0
    for group in groups if interleave else [[c] for c in configs]:
        start = time.perf_counter()
        subjects = [prepare(c, device) for c in group]
        for _ in range(repeats if interleave else 1):
            for subject in subjects:
                time_more(subject, device, 1 if interleave else repeats)
        for subject in subjects:
            row = finish(subject, short_len)
            done += 1
            took = time.perf_counter() - start
            status = f"ERROR {row.error}" if row.error else f"{row.median_ms:.1f} ms/step"
            print(f"[{done}/{len(configs)}] {row.config.label()}: {status} ({took:.1f} s)", file=sys.stderr, flush=True)
            yield row


# --------------------------------------------------------------------------------------------- output
COLUMNS = (
    "cell",
    "L",
    "T",
    "mode",
    "k",
    "ms",
    "t/base",
    "MB",
    "MB-x",
    "mem×",
    "mem×-x",
    "actual",
    "optimal",
    "eff",
    "fwd",
    "rev",
    "fwd@s",
    "rev@s",
    "Δfwd",
    "Δrev",
    "sync",
    "sync@s",
)
KEY_COLUMNS = 5
#: The issue's targets, printed under the header in the count columns.
TARGET_CELLS = (
    ["target", "", "", "", ""]
    + [""] * 9
    + [
        f"≤{OP_TARGETS['forward']:g}",
        f"≤{OP_TARGETS['reverse']:g}",
        f"≤{OP_TARGETS['forward']:g}",
        f"≤{OP_TARGETS['reverse']:g}",
        f"≤{OP_TARGETS['forward']:g}",
        f"≤{OP_TARGETS['reverse']:g}",
        f"≤{SYNC_TARGET}/{SYNC_TARGET}",
        "=sync",
    ]
)


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _syncs(pair: tuple[int, int] | None) -> str:
    return "" if pair is None else f"{pair[0]}/{pair[1]}"


def count_cells(row: Row) -> list[str]:
    """The op/sync columns of one row (empty where not counted)."""
    marginal = row.marginal_ops or (None, None)
    return [
        _num(row.ops_per_step_layer("forward"), 1),
        _num(row.ops_per_step_layer("reverse"), 1),
        _num(row.ops_per_step_layer("forward", short=True), 1),
        _num(row.ops_per_step_layer("reverse", short=True), 1),
        _num(marginal[0], 1),
        _num(marginal[1], 1),
        _syncs(row.syncs_per_window()),
        _syncs(row.syncs_per_window(short=True)),
    ]


def table_cells(row: Row) -> list[str]:
    """The printed columns of one row (accounting columns empty for baselines)."""
    c, s = row.config, row.stats or {}
    incl, excl = row.memory_bytes(True), row.memory_bytes(False)
    cells = [
        row.model,
        str(c.layers),
        str(c.seq_len),
        "-" if c.is_baseline else str(c.mode),
        "-" if c.is_baseline else fmt_bits(c.bits),
    ]
    if row.error is not None:
        return [*cells, f"ERROR: {row.error}"]
    return [
        *cells,
        _num(row.median_ms, 1),
        _num(row.time_ratio, 2),
        _num(None if incl is None else incl / MB, 2),
        _num(None if excl is None else excl / MB, 2),
        _num(row.mem_ratio_incl_input, 2),
        _num(row.mem_ratio_excl_input, 2),
        _num(s.get("actual_ratio"), 2),
        _num(s.get("optimal_ratio"), 2),
        _num(s.get("efficiency"), 3),
        *count_cells(row),
    ]


def fixed_width_table(
    columns: Sequence[str],
    key_columns: int,
    body: Sequence[Sequence[str]],
    new_group: Sequence[bool],
    pinned: Sequence[Sequence[str]] = (),
) -> str:
    """The benchmarks' fixed-width table: key columns left-aligned, the others right-aligned, a blank line
    before each row that starts a new group (``new_group``), and ``pinned`` rows (e.g. the issue's targets)
    under the header. A row shorter than ``columns`` is an error row: its key columns, then its message."""
    full = [b for b in [*body, *pinned] if len(b) == len(columns)]
    widths = [
        max([len(h)] + [len(b[i]) for b in body if i < key_columns and i < len(b)] + [len(b[i]) for b in full])
        for i, h in enumerate(columns)
    ]

    def line(cells: Sequence[str]) -> str:
        if len(cells) != len(columns):
            return "  ".join([c.ljust(w) for c, w in zip(cells[:key_columns], widths)] + list(cells[key_columns:]))
        return "  ".join(
            c.ljust(w) if i < key_columns else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    lines = [line(columns), line(["-" * w for w in widths]), *[line(p) for p in pinned]]
    for i, (cells, starts) in enumerate(zip(body, new_group)):
        if i and starts:
            lines.append("")
        lines.append(line(cells))
    return "\n".join(lines)


def format_table(rows: Sequence[Row]) -> str:
    """Fixed-width table, one line per row, a blank line before each baseline group; the issue's targets
    in a line under the header."""
    body = [table_cells(r) for r in rows]
    return fixed_width_table(COLUMNS, KEY_COLUMNS, body, [r.config.is_baseline for r in rows], [TARGET_CELLS])


def legend(device: torch.device, short_len: int | None) -> str:
    """What the columns mean."""
    what = "CUDA allocator peak over forward+backward" if device.type == "cuda" else "bytes saved for backward"
    text = (
        f"ms: median step (forward + backward); t/base: time / baseline time. MB: {what}, plus the input x; "
        "MB-x: without x. mem×, mem×-x: baseline MB / this MB. actual, optimal: the paper's memory ratios "
        "(normal/used, normal/optimal bits); eff: optimal/used bits."
    )
    if short_len is None:
        return text
    return text + (
        " fwd, rev: non-view ATen ops (benchmarks/opcount.py) per step per layer in the forward (module call) "
        f"and the reverse sweep (backward) at T; fwd@s, rev@s: the same at s = T {short_len} (one step on the "
        "first steps of x); Δfwd, Δrev: ops one more step of one layer adds (slope between s and T, no "
        "per-window constants). sync, sync@s: host syncs per window, forward/backward, at T and at s (equal: "
        "none per step). target: the issue's, for the default path (mode=reverse)."
    )


def check_op_targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's op and sync targets for every counted ``mode="reverse"`` row: ops per step per layer at T
    within :data:`OP_TARGETS`, at most :data:`SYNC_TARGET` syncs per window in forward and backward, and
    as many at T as at the short length (none per step; None when T is the short length)."""
    results = []
    for row in rows:
        if row.config.mode != "reverse" or row.counts is None or row.error is not None:
            continue
        fwd, rev = row.ops_per_step_layer("forward"), row.ops_per_step_layer("reverse")
        syncs, short = row.syncs_per_window(), row.syncs_per_window(short=True)
        assert fwd is not None and rev is not None and syncs is not None
        results.append(
            {
                "cell": row.config.cell,
                "layers": row.config.layers,
                "seq_len": row.config.seq_len,
                "bits": row.config.bits,
                "forward_ops": fwd,
                "reverse_ops": rev,
                "syncs": list(syncs),
                "forward_ops_ok": fwd <= OP_TARGETS["forward"],
                "reverse_ops_ok": rev <= OP_TARGETS["reverse"],
                "syncs_ok": max(syncs) <= SYNC_TARGET,
                "none_per_step": None if short is None else syncs == short,
            }
        )
    return results


def format_op_targets(targets: Sequence[dict[str, Any]]) -> str:
    """PASS/FAIL lines for the op and sync targets."""
    head = (
        f"Op/sync targets (issue 7, mode=reverse): <= {OP_TARGETS['forward']:g} forward and "
        f"<= {OP_TARGETS['reverse']:g} reverse ops per step per layer, <= {SYNC_TARGET} syncs per window "
        "each way, none per step:"
    )
    if not targets:
        return head + "\n  SKIP  no counted mode=reverse row"

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    lines = [head]
    for t in targets:
        lines.append(
            f"  {t['cell']} L={t['layers']} T={t['seq_len']} k={fmt_bits(t['bits'])}: "
            f"fwd {t['forward_ops']:.1f} {verdict(t['forward_ops_ok'])}, rev {t['reverse_ops']:.1f} "
            f"{verdict(t['reverse_ops_ok'])}, syncs {t['syncs'][0]}/{t['syncs'][1]} {verdict(t['syncs_ok'])}, "
            f"none per step {verdict(t['none_per_step'])}"
        )
    return "\n".join(lines)


def top_ops(rows: Sequence[Row], n: int = 12) -> str:
    """Per counted ``mode="reverse"`` row, the ``n`` most frequent ops of each phase per step per layer:
    where the counts come from."""
    lines = []
    for row in rows:
        if row.config.mode != "reverse" or row.counts is None or row.error is not None:
            continue
        scale = row.config.seq_len * row.config.layers
        lines.append(f"{row.config.label()}, ops per step per layer:")
        for phase in ("forward", "reverse"):
            ops = sorted(row.counts[phase]["ops"].items(), key=lambda kv: -kv[1])[:n]
            lines.append(f"  {phase}: " + ", ".join(f"{_short_op(k)} {v / scale:.2f}" for k, v in ops))
    return "\n".join(lines)


def _short_op(name: str) -> str:
    """``aten.mul.Tensor`` -> ``mul.Tensor``; ``.default`` dropped."""
    name = name.removeprefix("aten.")
    return name.removesuffix(".default")


def device_slug(device: torch.device) -> str:
    """``cpu`` or the CUDA card's name, lower-case with dashes."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def write_json(
    path: Path,
    device: torch.device,
    args: argparse.Namespace,
    rows: Sequence[Row],
    op_targets: Sequence[dict[str, Any]],
) -> None:
    """Write the results file (creating its directory)."""
    payload = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # The machine's 1/5/15-minute load averages when the results were written (others' jobs included).
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "mkldnn_enabled": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "memory_metric": "cuda_peak" if device.type == "cuda" else "saved_tensor_bytes",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [r.to_json() for r in rows],
        "op_targets": list(op_targets),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the flags and fill unset sizes from the paper's preset or ``--small``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths T (default 70 1000)")
    p.add_argument("--layers", type=int, nargs="+", help="num_layers values (default 1 2)")
    p.add_argument("--batch", type=int, help="batch size (default 20)")
    p.add_argument("--input-size", type=int, help="input features (default 650)")
    p.add_argument("--hidden", type=int, help="hidden size, even (default 650)")
    p.add_argument(
        "--bits",
        type=parse_bits,
        nargs="+",
        default=[2, 3, 5, None],
        help="max_forget_bits values: 1 2 3 5 none (default 2 3 5 none)",
    )
    p.add_argument("--modes", nargs="+", choices=["reverse", "store"], default=["reverse", "store"])
    p.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=["gru", "lstm"])
    p.add_argument("--repeats", type=int, help="timed steps after one warm-up; the median is reported (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads (default: torch's choice); 1 is steadier on a shared, busy CPU",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="JSON path (default benchmarks/results/rnn-<device>.json, rnn-<device>-small.json with --small)",
    )
    p.add_argument(
        "--small", action="store_true", help="quick preset: T 20 100, hidden/input 64, batch 4, L 1, 1 repeat"
    )
    p.add_argument(
        "--count-short-t",
        type=int,
        default=16,
        help="second window length for the op/sync counts, beside each row's T (default 16: one chunk)",
    )
    p.add_argument("--no-count", action="store_true", help="skip the op/sync counts (timing and memory only)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time the configurations of one (cell, layers, T) group in turns, one step each per round "
        "(steadier ratios on a shared machine; all of a group's models are alive at once)",
    )
    args = p.parse_args(argv)
    preset = SMALL_PRESET if args.small else PAPER_PRESET
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.hidden <= 0 or args.hidden % 2:
        p.error(f"--hidden must be a positive even number (reversible cells split the state), got {args.hidden}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    for name in ("batch", "input_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.seq_lens) < 1 or min(args.layers) < 1:
        p.error("--seq-lens and --layers must be positive")
    if args.count_short_t < 1:
        p.error("--count-short-t must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark, print the table (and the op/sync targets, and the most frequent ops), write the
    JSON; returns the rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.out is None:
        suffix = "-small" if args.small else ""  # a smoke run never overwrites the real results
        args.out = Path(__file__).resolve().parent / "results" / f"rnn-{device_slug(device)}{suffix}.json"
    configs = build_configs(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{len(configs)} configurations, {args.repeats} timed repeat(s) each",
        file=sys.stderr,
        flush=True,
    )
    short_len = None if args.no_count else args.count_short_t
    rows = list(run_all(configs, device, args.repeats, short_len, args.interleave))
    add_ratios(rows)
    op_targets = check_op_targets(rows)
    print(format_table(rows))
    print()
    print(legend(device, short_len))
    if short_len is not None:
        print()
        print(format_op_targets(op_targets))
        print()
        print(top_ops(rows))
    write_json(args.out, device, args, rows, op_targets)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
