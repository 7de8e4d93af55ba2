"""Benchmark the whole language-model training step: embedding → RNN → decoder → cross-entropy → backward.

Every configuration is a :class:`~lightning_revrnn.lm.LanguageModel` (the paper's AWD-LSTM-style model,
default dropouts, tied decoder) stepped with ``model.training_step(batch, 0)`` and ``loss.backward()``,
without a Trainer (``model.log`` is replaced by a no-op), on synthetic random tokens with
``batch["reset"] = True``. Per (cell, layers, T) group, side by side in this one process:

* the plain baseline: ``rnn="gru"`` / ``"lstm"`` (``nn.GRU`` / ``nn.LSTM``, cuDNN on CUDA);
* the same baseline under ``torch.utils.checkpoint`` (:class:`CheckpointedLM`, one row per
  ``--ckpt-chunks`` entry). What is checkpointed: the window is split into chunks of ``C`` steps, and
  *everything* of a chunk (embedding lookup and embedding dropout, the RNN layers, output dropout, decoder
  and summed cross-entropy) runs inside one ``checkpoint(..., use_reentrant=False)`` call. Between forward
  and backward only the chunks' inputs are held: the token ids, the targets and the hidden state entering
  each chunk; backward recomputes one chunk at a time. Dropout masks are those of the plain baseline (the
  word and output masks are drawn once per window, the RNN's locked/DropConnect masks are redrawn from the
  same RNG state in every chunk and in the recomputation), so the loss equals the plain row's loss;
* the reversible model (``rnn="revgru"`` / ``"revlstm"``, ``mode="reverse"``) for each ``--bits``: the
  embedding and the decoder+loss run per step inside the reverse sweep.

One *step* is: ``loss = model.training_step(batch, 0)``, ``loss.backward()``, gradients set to None.
Per configuration:

1. a warm-up step, its forward (``training_step``) wrapped in :func:`saved_tensor_bytes` excluding the
   parameters: the bytes autograd holds from forward to backward ("held"). For checkpointed rows the hook
   sees the checkpoints' saved inputs (hidden states at chunk boundaries, token ids, targets), not what the
   recomputation re-materialises; so a probe also runs the first (largest) chunk once with grad and counts
   what it saves ("recompute"): during backward, that much is alive on top of the held bytes. The
   reversible model's ``memory_stats()`` is read after this forward;
2. on CUDA, one step measured with the allocator: ``max_memory_allocated() - memory_allocated()`` at its
   start (peak over forward *and* backward, so it includes the parameter gradients, the reverse sweep's
   gradient accumulators and the checkpoint recomputation); the allocation still alive right after the
   forward is recorded as CUDA "held";
3. on CPU, one step traced with :class:`~lightning_revrnn.memory.MemoryTrace` (the profiler's allocation
   trace): the step's peak above what was allocated before it (parameters, batch), with the parameter
   gradients the step allocates ("peak+grad") and without them ("peak": activations and workspace of
   forward *and* backward, the reverse sweep's and the checkpoint recomputation's included);
4. ``--repeats`` timed steps, no hooks; the reported time is their median (``--interleave``: one step of
   each configuration of a group in turn, ``--repeats`` rounds);
5. the op and host-sync counts of one step (:mod:`opcount`; not for checkpointed rows, ``--no-count``
   skips them): non-view ATen ops per step per layer in the forward (``training_step``: stem, RNN, head
   and loss) and in ``backward()``, host syncs per window each way.

The memory figure "MB" is, on CPU, held + recompute (recompute is 0 for non-checkpointed rows), on CUDA the
allocator peak. Memory ratio = plain baseline MB / this MB (higher is better); time ratio = this time /
plain baseline time. The footer checks the issue's targets from the rows: a reversible LM (k=3) with
≥ 20x less activation memory than the baseline of the same size at T 70, ≥ 100x at T 1000 (the issue
states them against ``nn.LSTM``; the GRU family gets the same thresholds against ``nn.GRU``); and issue 7's
CPU targets: step time ≤ 1.5x the baseline (T 70 and 1000), saved bytes and peak ≥ 200x lower at T 70.

Sizes: the top (here the only) layer has ``--emb`` units, the tied decoder's width; ``--hidden`` (1150) is
the width of the layers below it, so with one layer it is unused and the RNN is 650 wide.

Usage::

    python benchmarks/lm_step.py                 # the paper's sizes (very long on CPU)
    python benchmarks/lm_step.py --small         # smoke run, well under a minute on 2 cores
    python benchmarks/lm_step.py --seq-lens 70 --layers 1 --bits 3 --repeats 1 --threads 1
    python benchmarks/lm_step.py --seq-lens 70 --layers 1 --ckpt-chunks --interleave --chunk 8   # the sweep's chunk
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from typing_extensions import override

from lightning_revrnn import ReversibleRNN
from lightning_revrnn.chunked_loss import DEFAULT_BLOCK_BYTES
from lightning_revrnn.core import protocol
from lightning_revrnn.fused import FusedBackend, StageCounter
from lightning_revrnn.lm.head import BoundDecoderHead
from lightning_revrnn.lm.model import Batch, LanguageModel, RnnType
from lightning_revrnn.memory import MemoryTrace, saved_tensor_bytes
from lightning_revrnn.shared import BoundEmbeddingStem

# Siblings are imported by their own names: run as a script, benchmarks/ is already sys.path[0]; run as
# ``python -m benchmarks.lm_step`` (or imported), this puts it there. The imports below rely on it.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from opcount import count_step
from rnn import BITS_CHOICES, MB, STAT_KEYS, device_slug, fixed_width_table, fmt_bits, parse_bits, sync

#: The paper's PTB sizes (2 layers: lower 1150 units, top = emb 650), used unless ``--small`` or a flag overrides.
PAPER_PRESET: dict[str, Any] = {
    "seq_lens": [70, 1000],
    "layers": [1, 2],
    "batch": 20,
    "vocab": 10000,
    "emb": 650,
    "hidden": 1150,
    "repeats": 3,
}
#: A quick smoke-test preset.
SMALL_PRESET: dict[str, Any] = {
    "seq_lens": [20, 100],
    "layers": [1],
    "batch": 4,
    "vocab": 200,
    "emb": 32,
    "hidden": 48,
    "repeats": 1,
}
#: The issue's targets: T → minimum (baseline memory / reversible memory) at ``TARGET_BITS``.
TARGETS: dict[int, float] = {70: 20.0, 1000: 100.0}
TARGET_BITS = 3
#: Issue 7's CPU targets: reversible step time at most this multiple of the baseline's (T 70 and 1000) ...
CPU_TIME_TARGET = 1.5
#: ... and saved bytes and step peak at least this many times lower than the baseline's at T 70.
CPU_MEMORY_TARGET = 200.0
CELL_NAMES = {"gru": ("GRU", "RevGRU"), "lstm": ("LSTM", "RevLSTM")}


# ---------------------------------------------------------------------------------- checkpointed baseline
@dataclass
class RngState:
    """The global RNG state (CPU, and the CUDA device when the step runs there) at one point."""

    cpu: Tensor
    devices: list[torch.device]
    device_states: list[Tensor]

    @classmethod
    def capture(cls, devices: list[torch.device]) -> RngState:
        return cls(torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices])

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.device_states):
            torch.cuda.set_rng_state(s, d)


class CheckpointedLM(LanguageModel):
    """The ``nn.GRU``/``nn.LSTM`` language model with its whole step checkpointed in chunks of ``chunk`` steps.

    Each chunk (embedding + embedding dropout → RNN → output dropout → decoder → summed cross-entropy) runs
    under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``; its inputs are the chunk's token ids and
    targets and the flat hidden state entering it, its outputs the chunk's loss sum and the flat final state.
    The masks match :class:`LanguageModel`'s plain ``training_step`` exactly (same seed, same draw order).
    """

    def __init__(self, *args: Any, chunk: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.reversible:
            raise ValueError("CheckpointedLM wraps the nn.GRU/nn.LSTM baselines only.")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}.")
        self.chunk = chunk
        self._window: tuple[RngState, BoundEmbeddingStem, BoundDecoderHead] | None = None  # the last one's

    # nn.GRU keeps per layer h_n (1, B, H); nn.LSTM a tuple (h_n, c_n). Checkpoint inputs must be top-level
    # tensors (nested ones would be held without passing through saved-tensor hooks), hence the flat form.
    def _flatten(self, state: list[Any]) -> list[Tensor]:
        return [t for s in state for t in (s if self.rnn.is_lstm else (s,))]

    def _unflatten(self, flat: Sequence[Tensor]) -> list[Any]:
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)] if self.rnn.is_lstm else list(flat)

    def _chunk_step(
        self,
        rng: RngState,
        stem: BoundEmbeddingStem,
        head: BoundDecoderHead,
        tokens: Tensor,
        targets: Tensor,
        *flat_hx: Tensor,
    ) -> tuple[Tensor, ...]:
        """One chunk, from token ids to the summed loss, with the window's bound stem and head (their masks);
        redraws the RNN's masks from ``rng`` (identical in every chunk and in the recomputation)."""
        with torch.random.fork_rng(devices=rng.devices):
            rng.restore()
            out, h_n = self.rnn(stem(tokens), self._unflatten(flat_hx) if flat_hx else None)
            logits = head.logits(out)
            total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return (total, *self._flatten(h_n))

    @override
    def window_loss(
        self, tokens: Tensor, hx: Any, stem: BoundEmbeddingStem, head: BoundDecoderHead
    ) -> tuple[Tensor, Any]:
        targets = head.targets
        devices = [tokens.device] if tokens.device.type == "cuda" else []
        self._window = (RngState.capture(devices), stem, head)  # the RNG: where the plain step's RNN draws masks
        flat = [] if hx is None else self._flatten(hx)
        total: Tensor | None = None
        for start in range(0, tokens.shape[0], self.chunk):
            end = start + self.chunk
            part, *flat = checkpoint(
                partial(self._chunk_step, *self._window),
                tokens[start:end],
                targets[start:end],
                *flat,
                use_reentrant=False,
                preserve_rng_state=False,
            )
            total = part if total is None else total + part
        assert total is not None
        return total, self._unflatten(flat)

    def recompute_probe(self, batch: Batch) -> int:
        """Bytes autograd saves when the first (largest) chunk of the last window runs once with grad: what
        backward re-materialises per chunk. Token ids and targets (already held) are not counted."""
        assert self._window is not None, "run training_step first"
        tokens, targets = batch["inputs"], batch["targets"]
        with torch.enable_grad(), saved_tensor_bytes(exclude=[*self.parameters(), tokens, targets]) as saved:
            result = self._chunk_step(*self._window, tokens[: self.chunk], targets[: self.chunk])
        del result
        return saved.total


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log``, which warns without a Trainer."""


# ---------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """One measured configuration. ``variant``: ``plain`` (baseline), ``ckpt`` (checkpointed baseline, chunk
    ``chunk``), ``rev`` (reversible, ``bits``)."""

    cell: str
    layers: int
    seq_len: int
    batch: int
    vocab: int
    emb: int
    hidden: int
    variant: str = "plain"
    bits: int | None = None
    chunk: int | None = None
    #: Reversible rows only: the fused path (``fused=True``, torch.compile stages).
    fused: bool = False
    #: Reversible rows only: the LM head's byte budget in MiB (``head_block_bytes``); None: the library default.
    head_mib: int | None = None

    @property
    def is_baseline(self) -> bool:
        """True for the plain ``nn.GRU`` / ``nn.LSTM`` row."""
        return self.variant == "plain"

    @property
    def group(self) -> tuple[str, int, int]:
        """Rows sharing this key are compared with the same baseline."""
        return (self.cell, self.layers, self.seq_len)

    @property
    def model_name(self) -> str:
        base, rev = CELL_NAMES[self.cell]
        if self.variant == "rev":
            return rev + ("+fused" if self.fused else "")
        return base + ("+ckpt" if self.variant == "ckpt" else "")

    def variant_text(self) -> str:
        """The table's variant column."""
        if self.variant == "rev":
            return f"k={fmt_bits(self.bits)}" + ("" if self.head_mib is None else f" head {self.head_mib}M")
        return f"C={self.chunk}" if self.variant == "ckpt" else "-"

    def label(self) -> str:
        """Short human-readable name for progress messages."""
        return f"{self.model_name} L={self.layers} T={self.seq_len} {self.variant_text()}"


@dataclass
class Row:
    """Measurements of one configuration (one table row, one JSON object)."""

    config: Config
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    loss: float | None = None
    param_bytes: int = 0
    saved_bytes: int | None = None
    recompute_bytes: int | None = None
    cuda_held_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    #: CPU (profiler trace): the step's peak above its start, without / with the parameter gradients it allocates.
    cpu_peak_bytes: int | None = None
    cpu_peak_incl_grad_bytes: int | None = None
    grad_bytes: int | None = None
    stats: dict[str, Any] | None = None
    #: Op and sync counts of one step (:meth:`opcount.StepCounts.to_json`).
    counts: dict[str, Any] | None = None
    error: str | None = None
    time_ratio: float | None = None
    mem_ratio: float | None = None
    held_ratio: float | None = None
    #: Plain baseline's CPU peak / this CPU peak (both without gradients).
    peak_ratio: float | None = None

    def memory_bytes(self) -> int | None:
        """The device's memory figure: CUDA allocator peak; on CPU saved-tensor bytes + checkpoint recompute."""
        if self.cuda_peak_bytes is not None:
            return self.cuda_peak_bytes
        return None if self.saved_bytes is None else self.saved_bytes + (self.recompute_bytes or 0)

    def held_bytes(self) -> int | None:
        """Held from forward to backward: allocated after the forward on CUDA, saved-tensor bytes on CPU."""
        return self.cuda_held_bytes if self.cuda_held_bytes is not None else self.saved_bytes

    def to_json(self) -> dict[str, Any]:
        """Flat JSON-serialisable mapping."""
        d = asdict(self)
        config = d.pop("config")
        return {
            **config,
            "model": self.config.model_name,
            "baseline": self.config.is_baseline,
            **d,
            "held_bytes": self.held_bytes(),
            "memory_bytes": self.memory_bytes(),
        }


def parse_chunk(text: str) -> str:
    """argparse type for ``--ckpt-chunks``: ``sqrt``, ``whole`` or a positive integer."""
    if text in ("sqrt", "whole") or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"a chunk is 'sqrt', 'whole' or a positive integer, got {text!r}")


def resolve_chunk(spec: str, seq_len: int) -> int:
    """Steps per checkpointed chunk: ceil(sqrt(T)), T, or the given number (at most T)."""
    if spec == "sqrt":
        return math.ceil(math.sqrt(seq_len))
    return seq_len if spec == "whole" else min(int(spec), seq_len)


def build_configs(args: argparse.Namespace) -> list[Config]:
    """All configurations, grouped: for each (cell, layers, T), the plain baseline first, then its
    checkpointed versions, then the reversible model per bits."""
    configs: list[Config] = []
    for cell in args.cells:
        for layers in args.layers:
            for seq_len in args.seq_lens:
                base = Config(cell, layers, seq_len, args.batch, args.vocab, args.emb, args.hidden)
                configs.append(base)
                chunks = dict.fromkeys(resolve_chunk(s, seq_len) for s in args.ckpt_chunks)  # ordered, unique
                configs += [Config(**{**asdict(base), "variant": "ckpt", "chunk": c}) for c in chunks]
                for b in args.bits:
                    configs.append(Config(**{**asdict(base), "variant": "rev", "bits": b}))
                    if args.fused:  # the fused path beside the eager one, timed in the same rounds
                        configs.append(Config(**{**asdict(base), "variant": "rev", "bits": b, "fused": True}))
                    for mib in args.head_block_mib:  # other head budgets beside the default, same rounds
                        configs.append(Config(**{**asdict(base), "variant": "rev", "bits": b, "head_mib": mib}))
    return configs


# ------------------------------------------------------------------------------------------- measuring
def build_model(config: Config, device: torch.device) -> LanguageModel:
    """A fresh model seeded with ``torch.manual_seed(0)``, logging disabled, in training mode."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=config.vocab, num_layers=config.layers, emb_size=config.emb, hidden_size=config.hidden)
    cell = cast(RnnType, config.cell)  # a command-line choice (a string); the model validates it
    model: LanguageModel
    if config.variant == "rev":
        model = LanguageModel(
            rnn=cast(RnnType, f"rev{cell}"),
            max_forget_bits=config.bits,
            mode="reverse",
            fused=config.fused,
            head_block_bytes=DEFAULT_BLOCK_BYTES if config.head_mib is None else config.head_mib * 2**20,
            vocab_size=config.vocab,
            num_layers=config.layers,
            emb_size=config.emb,
            hidden_size=config.hidden,
        )
    elif config.variant == "ckpt":
        assert config.chunk is not None
        model = CheckpointedLM(rnn=cell, chunk=config.chunk, **sizes)
    else:
        model = LanguageModel(
            rnn=cell, vocab_size=config.vocab, num_layers=config.layers, emb_size=config.emb, hidden_size=config.hidden
        )
    model.log = _no_log  # type: ignore[method-assign]  # logging off: steps run outside a Trainer
    return model.to(device).train()


def make_batch(config: Config, device: torch.device) -> Batch:
    """Random token ids (T, B) and next-token targets, the same for every config of one shape."""
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(0, config.vocab, (config.seq_len + 1, config.batch), generator=gen)
    return {"inputs": seq[:-1].clone().to(device), "targets": seq[1:].clone().to(device), "reset": True}


def backward_and_clear(model: LanguageModel, loss: Tensor) -> None:
    """``loss.backward()``, then every gradient set to None."""
    loss.backward()
    model.zero_grad(set_to_none=True)


def step(model: LanguageModel, batch: Batch) -> None:
    """One plain training step: forward, backward, gradients cleared."""
    backward_and_clear(model, model.training_step(batch, 0))


def measure_saved(model: LanguageModel, batch: Batch, row: Row) -> None:
    """One step whose forward counts the bytes autograd saves (parameters excluded); also the loss, the
    reversible accounting and, for checkpointed rows, the recomputation probe."""
    with saved_tensor_bytes(exclude=model.parameters()) as saved:
        loss = model.training_step(batch, 0)
    row.saved_bytes = saved.total
    row.loss = float(loss.detach())
    if row.config.variant == "rev":
        accounting = model.memory_stats()
        assert accounting is not None
        stats = accounting.as_dict()
        row.stats = {**{k: stats[k] for k in STAT_KEYS}, "layers": stats["layers"]}
    if isinstance(model, CheckpointedLM):
        row.recompute_bytes = model.recompute_probe(batch)
    backward_and_clear(model, loss)


def measure_cpu_peak(model: LanguageModel, batch: Batch, row: Row) -> None:
    """One step traced by the profiler: its peak above the start, with and without the gradients."""
    trace = MemoryTrace(torch.device("cpu"))
    trace.start()
    try:
        loss = model.training_step(batch, 0)
        loss.backward()
    except BaseException:
        trace.abort()
        raise
    del loss
    memory = trace.stop(model.parameters())
    model.zero_grad(set_to_none=True)
    row.cpu_peak_bytes = memory.peak_excl_grad_bytes
    row.cpu_peak_incl_grad_bytes = memory.peak_bytes
    row.grad_bytes = memory.grad_bytes


def measure_counts(model: LanguageModel, batch: Batch, row: Row) -> None:
    """Op and sync counts of one step: forward = ``training_step``, reverse = ``backward()``. A ``--fused`` row's
    step runs on a fused backend injected for it with a :class:`~lightning_revrnn.fused.StageCounter`, which
    counts its compiled kernels (the model's own backend is put back after)."""

    def step() -> Tensor:
        return model.training_step(batch, 0)

    if not row.config.fused:
        counts = count_step(step, row.config.seq_len, row.config.layers)
    else:
        rnn = model.rnn
        assert isinstance(rnn, ReversibleRNN)
        stages, own = StageCounter(), rnn.fused
        rnn.fused = FusedBackend(stages)
        try:
            counts = count_step(step, row.config.seq_len, row.config.layers, stage_counter=stages)
        finally:
            rnn.fused = own
    model.zero_grad(set_to_none=True)
    row.counts = counts.to_json()


def measure_cuda(model: LanguageModel, batch: Batch, device: torch.device, row: Row) -> None:
    """Allocator figures of one step above what was allocated at its start (batch, weights)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    loss = model.training_step(batch, 0)
    sync(device)
    row.cuda_held_bytes = torch.cuda.memory_allocated(device) - start
    backward_and_clear(model, loss)
    del loss
    sync(device)
    row.cuda_peak_bytes = torch.cuda.max_memory_allocated(device) - start


def time_steps(model: LanguageModel, batch: Batch, device: torch.device, repeats: int) -> list[float]:
    """Wall time of ``repeats`` steps, in milliseconds each."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step(model, batch)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


@dataclass
class Subject:
    """One configuration's row, model and batch, alive while its steps are timed (in turns with its group's
    other configurations under ``--interleave``). ``model`` is None once the configuration failed."""

    row: Row
    model: LanguageModel | None = None
    batch: Batch | None = None

    def fail(self, exc: Exception) -> None:
        """Record the error in the row and drop the model (the other configurations still run)."""
        self.row.error = f"{type(exc).__name__}: {exc}"
        self.model = self.batch = None


def prepare(config: Config, device: torch.device) -> Subject:
    """Build the model and batch and take the memory measurements (warm-up step, peak)."""
    subject = Subject(Row(config=config))
    try:
        model = build_model(config, device)
        subject.row.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        batch = make_batch(config, device)
        measure_saved(model, batch, subject.row)
        if device.type == "cuda":
            measure_cuda(model, batch, device, subject.row)
        else:
            measure_cpu_peak(model, batch, subject.row)
        subject.model, subject.batch = model, batch
    except Exception as exc:
        subject.fail(exc)
    return subject


def time_more(subject: Subject, device: torch.device, repeats: int) -> None:
    """Time ``repeats`` more steps of a prepared configuration."""
    if subject.model is None or subject.batch is None:
        return
    try:
        subject.row.times_ms += time_steps(subject.model, subject.batch, device, repeats)
    except Exception as exc:
        subject.fail(exc)


def finish(subject: Subject, count: bool) -> Row:
    """The median time, then (``count``, not for checkpointed rows) the op/sync counts; frees the model."""
    row = subject.row
    if subject.model is not None and subject.batch is not None:
        try:
            row.median_ms = statistics.median(row.times_ms)
            if count and row.config.variant != "ckpt":
                measure_counts(subject.model, subject.batch, row)
        except Exception as exc:
            subject.fail(exc)
    subject.model = subject.batch = None
    return row


def measure(config: Config, device: torch.device, repeats: int, count: bool = True) -> Row:
    """All measurements of one configuration; an exception is recorded in the row, not raised. ``count``:
    also the op/sync counts (never for checkpointed rows), after the timing."""
    subject = prepare(config, device)
    time_more(subject, device, repeats)
    return finish(subject, count)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` (inf for b = 0), None when either is missing."""
    if a is None or b is None:
        return None
    return float(a) / float(b) if b else float("inf")


def add_ratios(rows: list[Row]) -> None:
    """Time ratio (this/baseline) and memory ratios (baseline/this, for MB and held MB) against each group's
    plain baseline."""
    baselines = {r.config.group: r for r in rows if r.config.is_baseline and r.error is None}
    for row in rows:
        base = baselines.get(row.config.group)
        if base is None or row.error is not None:
            continue
        row.time_ratio = ratio(row.median_ms, base.median_ms)
        row.mem_ratio = ratio(base.memory_bytes(), row.memory_bytes())
        row.held_ratio = ratio(base.held_bytes(), row.held_bytes())
        row.peak_ratio = ratio(base.cpu_peak_bytes, row.cpu_peak_bytes)


def check_targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's targets, one entry per measured (cell, layers, T) group with T in :data:`TARGETS`:
    ``passed`` is None (SKIP) where the k=3 reversible row or the baseline is missing or failed."""
    results = []
    for group in dict.fromkeys(r.config.group for r in rows):
        cell, layers, seq_len = group
        if seq_len not in TARGETS:
            continue
        base = next((r for r in rows if r.config.group == group and r.config.is_baseline), None)
        rev = next(
            (r for r in rows if r.config.group == group and r.config.variant == "rev" and r.config.bits == TARGET_BITS),
            None,
        )
        ok = base is not None and rev is not None and base.error is None and rev.error is None
        value = rev.mem_ratio if ok and rev is not None else None
        results.append(
            {
                "cell": cell,
                "layers": layers,
                "seq_len": seq_len,
                "bits": TARGET_BITS,
                "threshold": TARGETS[seq_len],
                "mem_ratio": value,
                "held_ratio": rev.held_ratio if ok and rev is not None else None,
                "passed": None if value is None else value >= TARGETS[seq_len],
            }
        )
    return results


def run_all(
    configs: Sequence[Config], device: torch.device, repeats: int, count: bool = True, interleave: bool = False
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
            row = finish(subject, count)
            done += 1
            took = time.perf_counter() - start
            status = f"ERROR {row.error}" if row.error else f"{row.median_ms:.1f} ms/step"
            print(f"[{done}/{len(configs)}] {row.config.label()}: {status} ({took:.1f} s)", file=sys.stderr, flush=True)
            yield row


# --------------------------------------------------------------------------------------------- output
COLUMNS = (
    "model",
    "L",
    "T",
    "variant",
    "ms",
    "t/base",
    "held MB",
    "held×",
    "MB",
    "mem×",
    "peak MB",
    "peak×",
    "loss",
    "actual",
    "optimal",
    "eff",
    "fwd",
    "rev",
    "sync",
)
KEY_COLUMNS = 4


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / MB:.3f}"


def table_cells(row: Row) -> list[str]:
    """The printed columns of one row (accounting columns empty for the baselines)."""
    c, s = row.config, row.stats or {}
    cells = [c.model_name, str(c.layers), str(c.seq_len), c.variant_text()]
    if row.error is not None:
        return [*cells, f"ERROR: {row.error}"]
    n = row.counts
    return [
        *cells,
        _num(row.median_ms, 1),
        _num(row.time_ratio, 2),
        _mb(row.held_bytes()),
        _num(row.held_ratio, 1),
        _mb(row.memory_bytes()),
        _num(row.mem_ratio, 1),
        _mb(row.cpu_peak_bytes),
        _num(row.peak_ratio, 1),
        _num(row.loss, 4),
        _num(s.get("actual_ratio"), 2),
        _num(s.get("optimal_ratio"), 2),
        _num(s.get("efficiency"), 3),
        _num(None if n is None else n["forward_ops_per_step_layer"], 1),
        _num(None if n is None else n["reverse_ops_per_step_layer"], 1),
        "" if n is None else f"{n['forward_syncs_per_window']}/{n['reverse_syncs_per_window']}",
    ]


def format_table(rows: Sequence[Row]) -> str:
    """Fixed-width table, one line per row, a blank line before each baseline group."""
    body = [table_cells(r) for r in rows]
    return fixed_width_table(COLUMNS, KEY_COLUMNS, body, [r.config.is_baseline for r in rows])


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    """PASS/FAIL/SKIP lines for the issue's targets."""
    head = (
        f"Targets (issue): whole-step activation memory of the reversible LM (k={TARGET_BITS}) at least "
        + ", ".join(f"{v:g}x lower at T {t}" for t, v in TARGETS.items())
        + " than nn.LSTM of the same size (the GRU lines apply the same thresholds vs nn.GRU):"
    )
    if not targets:
        return head + f"\n  SKIP  no group measured at T in {sorted(TARGETS)}"
    lines = [head]
    for t in targets:
        base, rev = CELL_NAMES[t["cell"]]
        what = f"{rev} vs {base}  L={t['layers']} T={t['seq_len']}"
        if t["passed"] is None:
            lines.append(f"  SKIP  {what}: no k={TARGET_BITS} row or baseline (missing or failed)")
        else:
            verdict = "PASS" if t["passed"] else "FAIL"
            held = "" if t["held_ratio"] in (None, t["mem_ratio"]) else f"; held MB only: {t['held_ratio']:.1f}x"
            lines.append(f"  {verdict}  {what}: {t['mem_ratio']:.1f}x lower (target >= {t['threshold']:g}x){held}")
    return "\n".join(lines)


def check_cpu_targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Issue 7's CPU targets for every reversible k=3 row with a baseline: time ratio at most
    :data:`CPU_TIME_TARGET`; at T 70 saved bytes (held) and peak at least :data:`CPU_MEMORY_TARGET` times
    lower (None where not measured or not applicable)."""
    results = []
    for row in rows:
        c = row.config
        if (
            c.variant != "rev"
            or c.bits != TARGET_BITS
            or c.head_mib is not None
            or row.error is not None
            or row.time_ratio is None
        ):
            continue
        at_70 = c.seq_len == 70
        results.append(
            {
                "cell": c.cell,
                "layers": c.layers,
                "seq_len": c.seq_len,
                "bits": c.bits,
                "time_ratio": row.time_ratio,
                "time_ok": row.time_ratio <= CPU_TIME_TARGET,
                "held_ratio": row.held_ratio,
                "peak_ratio": row.peak_ratio,
                "held_ok": row.held_ratio >= CPU_MEMORY_TARGET if at_70 and row.held_ratio is not None else None,
                "peak_ok": row.peak_ratio >= CPU_MEMORY_TARGET if at_70 and row.peak_ratio is not None else None,
            }
        )
    return results


def format_cpu_targets(targets: Sequence[dict[str, Any]]) -> str:
    """PASS/FAIL lines for issue 7's CPU targets."""
    head = (
        f"Issue 7 CPU targets (k={TARGET_BITS}): step time <= {CPU_TIME_TARGET:g}x the baseline at T 70 and "
        f"1000; at T 70 saved bytes and peak (without gradients) >= {CPU_MEMORY_TARGET:g}x lower:"
    )
    if not targets:
        return head + "\n  SKIP  no CPU-measured reversible k=3 row with a baseline"

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    lines = [head]
    for t in targets:
        base, rev = CELL_NAMES[t["cell"]]
        held = "" if t["held_ratio"] is None else f"{t['held_ratio']:.1f}x"
        peak = "" if t["peak_ratio"] is None else f"{t['peak_ratio']:.1f}x"
        lines.append(
            f"  {rev} vs {base} L={t['layers']} T={t['seq_len']}: time {t['time_ratio']:.2f}x {verdict(t['time_ok'])}, "
            f"saved {held} lower {verdict(t['held_ok'])}, peak {peak} lower {verdict(t['peak_ok'])}"
        )
    return "\n".join(lines)


def legend(device: torch.device) -> str:
    """What the columns mean."""
    if device.type == "cuda":
        held, mem = (
            "CUDA memory allocated right after the forward",
            "CUDA allocator peak over forward+backward (incl. gradients and recomputation)",
        )
    else:
        held, mem = (
            "bytes autograd holds from forward to backward (checkpointed rows: their saved inputs)",
            "held MB + the largest checkpointed chunk's re-materialised activations",
        )
    return (
        f"ms: median step (training_step + backward); t/base: time / plain baseline time. held MB: {held}. "
        f"MB: {mem}. held×, mem×: baseline held MB / this held MB, baseline MB / this MB. "
        "peak MB: CPU step peak above its start without the parameter gradients (profiler trace; peak×: "
        "baseline / this). loss: of the first step (checkpointed = plain). fwd, rev: non-view ATen ops "
        "(benchmarks/opcount.py) per step per layer in training_step and in backward; sync: host syncs per "
        "window, forward/backward. "
        "variant: C = steps per checkpointed chunk, k = max_forget_bits. actual, optimal: the paper's memory "
        "ratios of the reversible RNN (normal/used, normal/optimal bits); eff: optimal/used bits."
    )


def write_json(
    path: Path,
    device: torch.device,
    args: argparse.Namespace,
    rows: Sequence[Row],
    targets: Sequence[dict[str, Any]],
    cpu_targets: Sequence[dict[str, Any]] = (),
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
        "memory_metric": "cuda_peak" if device.type == "cuda" else "saved_tensor_bytes+recompute",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [r.to_json() for r in rows],
        "targets": list(targets),
        "cpu_targets": list(cpu_targets),
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
    p.add_argument("--vocab", type=int, help="vocabulary size (default 10000)")
    p.add_argument("--emb", type=int, help="embedding size = top layer's units, even (default 650)")
    p.add_argument("--hidden", type=int, help="units of the lower layers, even (default 1150)")
    p.add_argument(
        "--bits",
        type=parse_bits,
        nargs="+",
        default=[2, 3, 5, None],
        help="max_forget_bits values: 1 2 3 5 none (default 2 3 5 none)",
    )
    p.add_argument(
        "--ckpt-chunks",
        type=parse_chunk,
        nargs="*",
        default=["sqrt"],
        help="checkpointed-baseline rows, one per chunk length: sqrt (ceil(sqrt(T))), whole (T) or "
        "a number of steps; none given: no checkpointed rows (default sqrt)",
    )
    p.add_argument("--cells", nargs="+", choices=sorted(CELL_NAMES), default=["gru", "lstm"])
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
        help="JSON path (default benchmarks/results/lm_step-<device>.json, lm_step-<device>-small.json with --small)",
    )
    p.add_argument("--no-count", action="store_true", help="skip the op/sync counts")
    p.add_argument(
        "--fused",
        action="store_true",
        help="also the reversible models with fused=True (torch.compile stages), beside the eager ones",
    )
    p.add_argument(
        "--head-block-mib",
        type=int,
        nargs="*",
        default=[],
        help="also the reversible models with these LM-head byte budgets (MiB), beside the default one",
    )
    p.add_argument(
        "--chunk",
        type=int,
        help="diagnostic: steps per chunk of the reversible models' window and sweep (the library: 4 up to 128 "
        "steps, else 8)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time the configurations of one (cell, layers, T) group in turns, one step each per round "
        "(steadier ratios on a shared machine; all of a group's models are alive at once)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="quick preset: vocab 200, emb 32, hidden 48, T 20 100, batch 4, L 1, 1 repeat",
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
    for name in ("emb", "hidden"):
        if getattr(args, name) <= 0 or getattr(args, name) % 2:
            p.error(f"--{name} must be a positive even number (reversible cells split the state)")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    for name in ("batch", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if min(args.seq_lens) < 1 or min(args.layers) < 1:
        p.error("--seq-lens and --layers must be positive")
    assert set(args.bits) <= set(BITS_CHOICES)
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark, print the table and the targets, write the JSON; returns the rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.chunk is not None:  # chunk_steps reads them at each call
        protocol.CHUNK = protocol.LONG_CHUNK = args.chunk
    if args.out is None:
        suffix = "-small" if args.small else ""  # a smoke run never overwrites the real results
        args.out = Path(__file__).resolve().parent / "results" / f"lm_step-{device_slug(device)}{suffix}.json"
    configs = build_configs(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{len(configs)} configurations, {args.repeats} timed repeat(s) each",
        file=sys.stderr,
        flush=True,
    )
    rows = list(run_all(configs, device, args.repeats, count=not args.no_count, interleave=args.interleave))
    add_ratios(rows)
    targets = check_targets(rows)
    cpu_targets = check_cpu_targets(rows) if device.type == "cpu" else []
    print(format_table(rows))
    print()
    print(legend(device))
    print()
    print(format_targets(targets))
    if device.type == "cpu":
        print()
        print(format_cpu_targets(cpu_targets))
    write_json(args.out, device, args, rows, targets, cpu_targets)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
