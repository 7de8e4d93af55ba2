"""Benchmark the whole attention seq2seq training step: encoder → decoder → attention → generator → loss →
backward → gradient clipping → optimizer step, reversible models against the ``nn.GRU`` / ``nn.LSTM`` baselines.

Every configuration is a :class:`~lightning_revrnn.translation.model.TranslationModel` at the paper's Multi30K sizes
(1 layer, 300 units, 300-d embeddings, batch 64, dropout 0.4, the paper's SGD from ``configure_optimizers``),
stepped without a Trainer the way Lightning's automatic optimisation runs it (``model.log`` is a no-op):

    ``loss = model.training_step(batch, 0)``; ``loss.backward()``; ``model.on_after_backward()``;
    ``clip_grad_norm_(parameters, 5)``; ``optimizer.step()``; ``optimizer.zero_grad(set_to_none=True)``.

Rows, per cell (``--cells``) and size (``--sizes``), side by side in this one process:

* the baseline ``rnn="gru"`` / ``"lstm"`` (``nn.GRU`` / ``nn.LSTM`` encoder and decoder, cuDNN on CUDA,
  attention over the whole encoder state, ``context="hidden"``: the paper's 300H);
* the reversible model ``rnn="revgru"`` / ``"revlstm"``, ``mode="reverse"``, with ``--context`` (default
  ``emb+slice``) and ``--slice-dim`` (default 20): the paper's Emb+20H, for each ``--bits`` (default 3).

Sizes: ``multi30k`` is one batch of 64 real Multi30K training length pairs (source and target lengths in
tokens): the length pairs of the training split (``$REVRNN_DATA_DIR/multi30k/tok/train.lc.norm.tok.{en,de}``
or ``--data-dir``; pairs over 50 tokens dropped, as the DataModule does) are cut into batches by the
DataModule's own bucketing (:func:`~lightning_revrnn.datamodules.bucketing.training_plan`, seed
``--seed``), and the batch with the median padded size (source + target steps) of that epoch is used.
Without the files, the length pairs are drawn from the marginal length histograms below
(:data:`FALLBACK_SRC_LENGTHS`, :data:`FALLBACK_TGT_LENGTHS`: the training split's, counted once), source and
target independently. Vocabulary sizes are those of the training split (every token, plus the four
specials: 10,214 English, 18,726 German), or ``--src-vocab`` / ``--tgt-vocab``. An integer size ``N``
is a batch of sentences of exactly ``N`` source tokens and ``N`` decoder steps (BOS + ``N - 1`` words),
no padding. Token ids are uniform random non-special ids (seeded): the values do not change the work.

Per configuration:

1. a warm-up step;
2. one step traced with :class:`~lightning_revrnn.memory.MemoryTrace` (the library's allocation trace,
   what ``MemoryReport`` logs; its pack hook keeps a detached alias, so that a graph the step discards
   without backward is freed as it is without the trace, and its storages do not count as saved):
   ``saved`` = storages allocated in the forward and held by autograd for backward; ``peak`` = highest
   allocation level above the step's start over forward, backward, clipping and the optimizer step (on CUDA:
   the allocator's ``max_memory_allocated``), ``grad`` = parameter gradients allocated in it, ``peak excl.
   grad`` = the peak without them: the step's activation memory (activations,
   the reverse sweeps' buffers and temporaries), the figure the issue's targets compare. On CUDA, also the
   bytes still allocated right after the forward ("held"). The paper's accounting of the encoder and of the
   decoder (``model.memory_stats()``: actual = normal/used bits, optimal = normal/optimal bits; the
   encoder's stored slice counts 32 bits per unit and step) is read after this step's forward;
3. ``--repeats`` timed steps without hooks, interleaved over the group's rows (one step of every row per
   round, so a busy shared CPU slows all rows alike); the reported time is each row's median.

Ratios against the group's baseline: ``t/base`` = time / baseline time; ``saved×``, ``peak×`` = baseline bytes
/ this row's bytes (higher is better). The footer checks the issue's targets (at ``k = 3``, Emb+20H):
accounting decoder >= 10x and encoder >= 5x (the issue asks for these on *trained* weights; here the
weights are the initial ones, see ``benchmarks/multi30k_repro.sh`` for trained ones); measured step
activation memory (peak excl. grad) >= 5x below the baseline at Multi30K sizes and >= 30x at length 200;
step time <= 3x the baseline on CPU.

Reading the peaks (allocation traces, library chunk of 16 target steps). The reversible decoder's head runs
the generator and cross-entropy a block of rows at a time (``TranslationModel(head_block_bytes=8 MiB)``,
:mod:`lightning_revrnn.chunked_loss`) and the attention a block of source positions at a time
(:mod:`lightning_revrnn.translation.attention_blocks`), adding its parameter and memory gradients straight into the
reverse sweep's accumulators; those accumulators become the parameters' ``.grad`` storages, so "peak excl.
grad" leaves them out, as it does the baselines' gradients. What remains in the reversible peak: at Multi30K
sizes one head chunk's working set (two logits blocks of ~4 MB, the chunk's attention and layer tensors) and
at length 200 the encoder's reverse sweep (its source-embedding gradient accumulator, 12 MB, which is summed
into the decoder side's and so freed, plus a few MB of buffers and per-chunk tensors). The baselines' peak is
what they save (every chunk's log-softmax: ``T × B × vocab`` floats, and the dropout-masked memory once per
chunk) plus one chunk's backward (three ``C × B × vocab`` float tensors: 3 × 77 MB at ``C=16, B=64,
V=18,726``); at Multi30K sizes (``T ≈ 14``) one chunk is the whole target.

``--head-chunk C`` is a diagnostic: it sets the target steps the attention/generator/loss head runs at once
(the sweep's ``chunk_steps``: 4 up to 128 steps, else 8, in the library; and the baselines'
``lightning_revrnn.translation.attention.BASELINE_CHUNK``, 8) for every row, to show how much of the peak the
chunk's ``C × B × vocab`` logits are.

Usage::

    python benchmarks/nmt_step.py                          # Multi30K sizes and length 200, GRU and LSTM
    python benchmarks/nmt_step.py --sizes multi30k --repeats 3 --threads 1
    python benchmarks/nmt_step.py --small                  # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
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
from torch import Tensor

import lightning_revrnn.core.protocol as protocol
import lightning_revrnn.translation.attention as attention_module
from lightning_revrnn.datamodules.bucketing import training_plan
from lightning_revrnn.datamodules.parallel import EncodedPairs, ParallelText, TranslationBatch, collate
from lightning_revrnn.datamodules.vocabulary import SPECIALS
from lightning_revrnn.memory import MemoryTrace, StepMemory
from lightning_revrnn.translation.model import ContextType, RnnType, TranslationModel

# Siblings are imported by their own names: run as a script, benchmarks/ is already sys.path[0]; run as
# ``python -m benchmarks.nmt_step`` (or imported), this puts it there. The imports below rely on it.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from rnn import BITS_CHOICES, MB, STAT_KEYS, device_slug, fixed_width_table, fmt_bits, parse_bits, sync

MULTI30K = "multi30k"
#: The paper's Multi30K model and batch, used unless ``--small`` or a flag overrides them.
PAPER_PRESET: dict[str, Any] = {
    "sizes": [MULTI30K, "200"],
    "batch": 64,
    "hidden": 300,
    "emb": 300,
    "slice_dim": 20,
    "repeats": 3,
    "src_vocab": None,
    "tgt_vocab": None,
    "threads": None,
}
#: A quick smoke-test preset (still the real Multi30K length distribution, tiny layers and vocabularies).
SMALL_PRESET: dict[str, Any] = {
    "sizes": [MULTI30K, "30"],
    "batch": 8,
    "hidden": 32,
    "emb": 32,
    "slice_dim": 4,
    "repeats": 1,
    "src_vocab": 300,
    "tgt_vocab": 400,
    "threads": 1,
}
#: Gradient-norm clipping of the paper (``Trainer(gradient_clip_val=5)`` in the configs).
CLIP = 5.0
#: Training pairs longer than this (either side, in tokens) are dropped, as ``Multi30KDataModule(max_len=50)``.
MAX_LEN = 50
#: Vocabulary sizes of the Multi30K training split (every token + the 4 specials), when its files are absent.
FALLBACK_VOCAB = (10214, 18726)
#: Multi30K task-1 training split, tokenised English: sentence length → number of sentences (29,000 in all).
FALLBACK_SRC_LENGTHS: dict[int, int] = {
    4: 8,
    5: 34,
    6: 211,
    7: 783,
    8: 1748,
    9: 2475,
    10: 3084,
    11: 3372,
    12: 3243,
    13: 2872,
    14: 2517,
    15: 2107,
    16: 1548,
    17: 1294,
    18: 953,
    19: 761,
    20: 551,
    21: 420,
    22: 285,
    23: 197,
    24: 158,
    25: 105,
    26: 82,
    27: 49,
    28: 42,
    29: 24,
    30: 18,
    31: 12,
    32: 11,
    33: 9,
    34: 5,
    35: 10,
    36: 3,
    37: 1,
    38: 4,
    39: 3,
    40: 1,
}
#: The same for the tokenised German side.
FALLBACK_TGT_LENGTHS: dict[int, int] = {
    2: 3,
    3: 2,
    4: 26,
    5: 153,
    6: 601,
    7: 1487,
    8: 2246,
    9: 2873,
    10: 3215,
    11: 3241,
    12: 2895,
    13: 2525,
    14: 2166,
    15: 1692,
    16: 1417,
    17: 1143,
    18: 834,
    19: 660,
    20: 479,
    21: 355,
    22: 299,
    23: 197,
    24: 119,
    25: 108,
    26: 76,
    27: 47,
    28: 44,
    29: 22,
    30: 19,
    31: 15,
    32: 12,
    33: 5,
    34: 8,
    35: 8,
    36: 4,
    38: 1,
    40: 1,
    43: 1,
    44: 1,
}
#: The issue's targets: size label → minimum (baseline / reversible) step activation memory at TARGET_BITS.
MEMORY_TARGETS: dict[str, float] = {MULTI30K: 5.0, "T200": 30.0}
#: Paper accounting targets (actual ratio, Emb+20H, TARGET_BITS): side → minimum.
ACCOUNTING_TARGETS: dict[str, float] = {"decoder": 10.0, "encoder": 5.0}
#: Step time target on CPU: reversible time / baseline time at most this.
TIME_TARGET = 3.0
TARGET_BITS = 3
TARGET_CONTEXT = ("emb+slice", 20)
CELL_NAMES = {"gru": ("GRU", "RevGRU"), "lstm": ("LSTM", "RevLSTM")}
CONTEXT_NAMES = {"slice": "{d}H", "emb": "Emb", "emb+slice": "Emb+{d}H", "hidden": "{h}H"}


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class BatchShape:
    """The lengths of one benchmark batch: per sentence, source tokens and target words (without BOS/EOS)."""

    label: str
    src_lengths: tuple[int, ...]
    tgt_lengths: tuple[int, ...]
    origin: str

    @property
    def src_steps(self) -> int:
        """Padded source length ``S`` (encoder steps)."""
        return max(self.src_lengths)

    @property
    def tgt_steps(self) -> int:
        """Padded decoder length ``T`` (BOS + the longest target, or its words + EOS)."""
        return max(self.tgt_lengths) + 1

    def summary(self) -> dict[str, Any]:
        """JSON description: padded steps, real tokens and where the lengths came from."""
        return {
            "label": self.label,
            "src_steps": self.src_steps,
            "tgt_steps": self.tgt_steps,
            "src_tokens": sum(self.src_lengths),
            "tgt_positions": sum(n + 1 for n in self.tgt_lengths),
            "batch": len(self.src_lengths),
            "origin": self.origin,
        }


def multi30k_dir(data_dir: Path | None) -> Path | None:
    """The Multi30K ``tok/`` folder (``data_dir``, else ``$REVRNN_DATA_DIR/multi30k``), None when it is unset."""
    if data_dir is not None:
        return data_dir / "tok"
    root = os.environ.get("REVRNN_DATA_DIR")
    return Path(root) / "multi30k" / "tok" if root else None


def read_train_sentences(tok_dir: Path | None) -> tuple[list[list[str]], list[list[str]]] | None:
    """The tokenised English and German training sentences, or None when the files are not there."""
    if tok_dir is None:
        return None
    paths = [tok_dir / f"train.lc.norm.tok.{lang}" for lang in ("en", "de")]
    if not all(p.is_file() for p in paths):
        return None
    en, de = ([line.split() for line in p.read_text(encoding="utf-8").splitlines()] for p in paths)
    if len(en) != len(de):
        raise ValueError(f"{paths[0]} has {len(en)} lines but {paths[1]} has {len(de)}: the files are not aligned.")
    return en, de


def vocabulary_size(sentences: list[list[str]]) -> int:
    """Tokens of a training side plus the specials (the DataModule's vocabulary at ``min_freq=1``)."""
    return len({tok for s in sentences for tok in s} - set(SPECIALS)) + len(SPECIALS)


def fallback_lengths(seed: int) -> tuple[Tensor, Tensor]:
    """Source and target lengths of 29,000 pairs, each side following its histogram, paired at random."""

    def expand(hist: dict[int, int]) -> Tensor:
        return torch.tensor([n for n, count in sorted(hist.items()) for _ in range(count)], dtype=torch.long)

    gen = torch.Generator().manual_seed(seed)
    src, tgt = expand(FALLBACK_SRC_LENGTHS), expand(FALLBACK_TGT_LENGTHS)
    return src[torch.randperm(src.numel(), generator=gen)], tgt[torch.randperm(tgt.numel(), generator=gen)]


def median_bucketed_batch(src_len: Tensor, tgt_len: Tensor, batch: int, seed: int) -> Tensor:
    """Pair indices of the batch with the median padded size (source + target steps) among one epoch of the
    DataModule's bucketed training batches."""
    plan = training_plan(src_len, tgt_len, batch, torch.Generator().manual_seed(seed))
    sizes = [int(src_len[b].max()) + int(tgt_len[b].max()) for b in plan]
    order = sorted(range(len(plan)), key=lambda i: sizes[i])
    return plan[order[len(order) // 2]]


def multi30k_shape(tok_dir: Path | None, batch: int, seed: int) -> BatchShape:
    """One batch of real Multi30K training length pairs (see the module docstring)."""
    sentences = read_train_sentences(tok_dir)
    if sentences is not None:
        src_len = torch.tensor([len(s) for s in sentences[0]])
        tgt_len = torch.tensor([len(s) for s in sentences[1]])
        kept = (src_len <= MAX_LEN) & (tgt_len <= MAX_LEN)
        src_len, tgt_len = src_len[kept], tgt_len[kept]
        origin = f"median bucketed batch of {tok_dir}/train.lc.norm.tok.{{en,de}} (seed {seed})"
    else:
        src_len, tgt_len = fallback_lengths(seed)
        origin = f"median bucketed batch of the built-in Multi30K length histograms (seed {seed})"
    rows = median_bucketed_batch(src_len, tgt_len, batch, seed)
    return BatchShape(MULTI30K, tuple(src_len[rows].tolist()), tuple(tgt_len[rows].tolist()), origin)


def fixed_shape(length: int, batch: int) -> BatchShape:
    """``batch`` sentences of ``length`` source tokens and ``length`` decoder steps, no padding."""
    return BatchShape(f"T{length}", (length,) * batch, (length - 1,) * batch, "fixed length")


def make_batch(shape: BatchShape, src_vocab: int, tgt_vocab: int, seed: int, device: torch.device) -> TranslationBatch:
    """A padded :class:`TranslationBatch` with ``shape``'s lengths and random non-special ids, built by the
    DataModule's own ``collate`` (rows by descending source length, BOS/EOS, padding masks)."""
    gen = torch.Generator().manual_seed(seed)

    def side(lengths: Sequence[int], vocab: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(len(SPECIALS), vocab, (sum(lengths),), generator=gen)
        offsets = torch.tensor([0, *lengths]).cumsum(0)
        return ids, offsets

    n = len(shape.src_lengths)
    pairs = EncodedPairs(
        *side(shape.src_lengths, src_vocab), *side(shape.tgt_lengths, tgt_vocab), text=ParallelText([""] * n, [""] * n)
    )
    batch = collate(pairs, list(range(n)))
    for name in ("src", "src_keep", "tgt_in", "tgt_out", "tgt_keep"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


# ---------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """One measured configuration. ``bits`` and ``context`` describe the reversible rows (``variant="rev"``);
    the baseline (``variant="base"``) attends over its whole hidden state."""

    cell: str
    size: str
    batch: int
    hidden: int
    emb: int
    src_vocab: int
    tgt_vocab: int
    variant: str = "base"
    bits: int | None = None
    context: str = "hidden"
    slice_dim: int = 0

    @property
    def is_baseline(self) -> bool:
        """True for the ``nn.GRU`` / ``nn.LSTM`` row."""
        return self.variant == "base"

    @property
    def group(self) -> tuple[str, str]:
        """Rows sharing this key are compared with the same baseline."""
        return (self.cell, self.size)

    @property
    def model_name(self) -> str:
        base, rev = CELL_NAMES[self.cell]
        return base if self.is_baseline else rev

    def context_text(self) -> str:
        """The paper's name of the attention memory (``Emb+20H``, ``300H``, ...)."""
        return CONTEXT_NAMES[self.context].format(d=self.slice_dim, h=self.hidden)

    def variant_text(self) -> str:
        """The table's variant column: context, and the bits of a reversible row."""
        return self.context_text() + ("" if self.is_baseline else f" k={fmt_bits(self.bits)}")

    def label(self) -> str:
        """Short human-readable name for progress messages."""
        return f"{self.model_name} {self.size} {self.variant_text()}"


@dataclass
class Row:
    """Measurements of one configuration (one table row, one JSON object)."""

    config: Config
    shape: dict[str, Any] = field(default_factory=dict)
    head_chunk: int = 0
    times_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    loss: float | None = None
    param_bytes: int = 0
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    grad_bytes: int | None = None
    peak_excl_grad_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    cuda_held_bytes: int | None = None
    accounting: dict[str, dict[str, Any]] | None = None
    error: str | None = None
    time_ratio: float | None = None
    saved_ratio: float | None = None
    peak_ratio: float | None = None
    peak_incl_grad_ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Flat JSON-serialisable mapping."""
        d = asdict(self)
        config = d.pop("config")
        return {
            **config,
            "model": self.config.model_name,
            "context_name": self.config.context_text(),
            "baseline": self.config.is_baseline,
            **d,
        }


def build_configs(args: argparse.Namespace, sizes: Sequence[str]) -> list[Config]:
    """All configurations, grouped by (cell, size): the baseline first, then the reversible rows per bits."""
    configs = []
    for cell in args.cells:
        for size in sizes:
            base = Config(cell, size, args.batch, args.hidden, args.emb, args.src_vocab, args.tgt_vocab)
            configs.append(base)
            configs += [
                Config(
                    **{
                        **asdict(base),
                        "variant": "rev",
                        "bits": b,
                        "context": args.context,
                        "slice_dim": args.slice_dim,
                    }
                )
                for b in args.bits
            ]
    return configs


# ------------------------------------------------------------------------------------------- measuring
def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log``, which warns without a Trainer."""


@dataclass
class Subject:
    """One configuration ready to step: its model, the model's own optimizer and the batch."""

    model: TranslationModel
    optimizer: torch.optim.Optimizer
    batch: TranslationBatch


def build_subject(config: Config, batch: TranslationBatch, device: torch.device) -> Subject:
    """A fresh model seeded with ``torch.manual_seed(0)``, logging disabled, in training mode, and the
    optimizer its ``configure_optimizers`` returns (the paper's SGD)."""
    torch.manual_seed(0)
    sized = partial(
        TranslationModel,
        hidden_size=config.hidden,
        embedding_size=config.emb,
        num_layers=1,
        src_vocab_size=config.src_vocab,
        tgt_vocab_size=config.tgt_vocab,
    )
    # cell and context are command-line choices (strings); the model validates them.
    if config.is_baseline:
        model = sized(rnn=cast(RnnType, config.cell), context="hidden")
    else:
        model = sized(
            rnn=cast(RnnType, f"rev{config.cell}"),
            context=cast(ContextType, config.context),
            slice_dim=config.slice_dim,
            max_forget_bits=config.bits,
            mode="reverse",
        )
    model.log = _no_log  # type: ignore[method-assign]  # logging off: steps run outside a Trainer
    model = model.to(device).train()
    optimizers = model.configure_optimizers()
    assert isinstance(optimizers, dict)
    return Subject(model, optimizers["optimizer"], batch)


def training_step(subject: Subject, trace: MemoryTrace | None = None) -> tuple[Tensor, StepMemory | None, int | None]:
    """One whole step as Lightning's automatic optimisation runs it; returns the loss, and with ``trace`` the
    traced step's memory and (CUDA) the bytes allocated right after the forward. The gradients are set to
    None after the step (so each step allocates them anew)."""
    model, optimizer = subject.model, subject.optimizer
    measured: StepMemory | None = None
    held: int | None = None
    cuda = trace is not None and trace.device.type == "cuda"
    start = torch.cuda.memory_allocated(trace.device) if cuda else 0  # type: ignore[union-attr]
    if trace is not None:
        trace.start()
        trace.begin_forward()
    try:
        loss = model.training_step(subject.batch, 0)
        if trace is not None:
            trace.end_forward()
            if cuda:
                torch.cuda.synchronize(trace.device)
                held = torch.cuda.memory_allocated(trace.device) - start
        loss.backward()
        model.on_after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        if trace is not None:
            measured = trace.stop(model.parameters())
    except BaseException:
        if trace is not None:
            trace.abort()
        raise
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), measured, held


def accounting_of(model: TranslationModel) -> dict[str, dict[str, Any]] | None:
    """The paper's accounting of the last training forward, per side (None for the baselines)."""
    stats = model.memory_stats()
    if stats is None:
        return None
    keys = (*STAT_KEYS, "stored_bits")
    return {side: {k: s[k] for k in keys} for side, s in stats.as_dict().items()}


def measure_memory(subject: Subject, device: torch.device, row: Row) -> None:
    """The warm-up step, then one traced step: saved, peak, gradient bytes, accounting."""
    training_step(subject)
    loss, measured, held = training_step(subject, MemoryTrace(device))
    assert measured is not None
    row.loss = float(loss)
    row.saved_bytes = measured.saved_bytes
    row.peak_bytes = measured.peak_bytes
    row.grad_bytes = measured.grad_bytes
    row.peak_excl_grad_bytes = measured.peak_excl_grad_bytes
    if device.type == "cuda":
        row.cuda_peak_bytes, row.cuda_held_bytes = measured.peak_bytes, held
    row.accounting = accounting_of(subject.model)


def timed_step(subject: Subject, device: torch.device) -> float:
    """Wall time of one step, in milliseconds."""
    sync(device)
    start = time.perf_counter()
    training_step(subject)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def measure_group(
    configs: Sequence[Config], shape: BatchShape, device: torch.device, repeats: int, seed: int
) -> list[Row]:
    """Memory of every configuration of one group, then ``repeats`` interleaved timing rounds. A failing
    configuration is recorded in its row (and left out of the rounds), the others still run."""
    rows = [Row(config=c, shape=shape.summary(), head_chunk=sweep_chunk(shape)) for c in configs]
    subjects: list[Subject | None] = []
    for config, row in zip(configs, rows):
        started = time.perf_counter()
        try:
            batch = make_batch(shape, config.src_vocab, config.tgt_vocab, seed, device)
            subject = build_subject(config, batch, device)
            row.param_bytes = sum(p.numel() * p.element_size() for p in subject.model.parameters())
            measure_memory(subject, device, row)
            subjects.append(subject)
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            subjects.append(None)
        status = f"ERROR {row.error}" if row.error else f"peak {row.peak_excl_grad_bytes / MB:.1f} MB"  # type: ignore[operator]
        print(
            f"  {config.label()}: memory measured, {status} ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    for r in range(repeats):
        for prepared, row in zip(subjects, rows):
            if prepared is None or row.error is not None:
                continue
            try:
                row.times_ms.append(timed_step(prepared, device))
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
        print(
            f"  round {r + 1}/{repeats}: "
            + ", ".join(
                f"{row.config.model_name} {row.times_ms[-1]:.0f} ms" for row in rows if row.times_ms and not row.error
            ),
            file=sys.stderr,
            flush=True,
        )
    for row in rows:
        if row.times_ms and row.error is None:
            row.median_ms = statistics.median(row.times_ms)
    return rows


def run_all(
    configs: Sequence[Config], shapes: dict[str, BatchShape], device: torch.device, repeats: int, seed: int
) -> Iterator[Row]:
    """Measure every group in order, reporting progress on stderr."""
    groups = list(dict.fromkeys(c.group for c in configs))
    for i, group in enumerate(groups, 1):
        shape = shapes[group[1]]
        print(
            f"[{i}/{len(groups)}] {CELL_NAMES[group[0]][0]} family, {group[1]} (S={shape.src_steps}, "
            f"T={shape.tgt_steps}, batch {len(shape.src_lengths)})",
            file=sys.stderr,
            flush=True,
        )
        yield from measure_group([c for c in configs if c.group == group], shape, device, repeats, seed)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` (inf for b = 0), None when either is missing."""
    if a is None or b is None:
        return None
    return float(a) / float(b) if b else float("inf")


def add_ratios(rows: list[Row]) -> None:
    """Time ratio (this/baseline) and memory ratios (baseline/this) against each group's baseline."""
    baselines = {r.config.group: r for r in rows if r.config.is_baseline and r.error is None}
    for row in rows:
        base = baselines.get(row.config.group)
        if base is None or row.error is not None:
            continue
        row.time_ratio = ratio(row.median_ms, base.median_ms)
        row.saved_ratio = ratio(base.saved_bytes, row.saved_bytes)
        row.peak_ratio = ratio(base.peak_excl_grad_bytes, row.peak_excl_grad_bytes)
        row.peak_incl_grad_ratio = ratio(base.peak_bytes, row.peak_bytes)


# --------------------------------------------------------------------------------------------- targets
def is_target_row(row: Row) -> bool:
    """The reversible row the issue's targets are stated for: k=3, Emb+20H."""
    c = row.config
    return not c.is_baseline and c.bits == TARGET_BITS and (c.context, c.slice_dim) == TARGET_CONTEXT


def check_targets(rows: Sequence[Row], device: torch.device) -> list[dict[str, Any]]:
    """One entry per checked target: ``what``, ``value``, ``threshold``, ``kind`` (``min``/``max``), ``passed``
    (None: the row or its baseline is missing or failed)."""
    results: list[dict[str, Any]] = []

    def add(what: str, value: float | None, threshold: float, kind: str = "min") -> None:
        passed = None if value is None else (value >= threshold if kind == "min" else value <= threshold)
        results.append({"what": what, "value": value, "threshold": threshold, "kind": kind, "passed": passed})

    for row in rows:
        if not is_target_row(row):
            continue
        c = row.config
        name = f"{c.model_name} {c.variant_text()} vs {CELL_NAMES[c.cell][0]} at {c.size}"
        ok = row.error is None
        for side, threshold in ACCOUNTING_TARGETS.items():
            stats = (row.accounting or {}).get(side, {})
            add(
                f"{name}: {side} accounting (actual ratio, initial weights)",
                stats.get("actual_ratio") if ok else None,
                threshold,
            )
        if c.size in MEMORY_TARGETS:
            add(
                f"{name}: step activation memory (peak excl. grad) ratio",
                row.peak_ratio if ok else None,
                MEMORY_TARGETS[c.size],
            )
        if device.type == "cpu":
            add(f"{name}: step time ratio (CPU)", row.time_ratio if ok else None, TIME_TARGET, "max")
    return results


# --------------------------------------------------------------------------------------------- output
COLUMNS = (
    "model",
    "size",
    "S",
    "T",
    "variant",
    "ms",
    "t/base",
    "saved MB",
    "saved×",
    "peak MB",
    "peak×",
    "grad MB",
    "loss",
    "enc act",
    "enc opt",
    "dec act",
    "dec opt",
)
KEY_COLUMNS = 5


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / MB:.2f}"


def table_cells(row: Row) -> list[str]:
    """The printed columns of one row (accounting columns empty for the baselines)."""
    c, acc = row.config, row.accounting or {}
    enc, dec = acc.get("encoder", {}), acc.get("decoder", {})
    cells = [
        c.model_name,
        c.size,
        str(row.shape.get("src_steps", "")),
        str(row.shape.get("tgt_steps", "")),
        c.variant_text(),
    ]
    if row.error is not None:
        return [*cells, f"ERROR: {row.error}"]
    return [
        *cells,
        _num(row.median_ms, 0),
        _num(row.time_ratio, 2),
        _mb(row.saved_bytes),
        _num(row.saved_ratio, 1),
        _mb(row.peak_excl_grad_bytes),
        _num(row.peak_ratio, 2),
        _mb(row.grad_bytes),
        _num(row.loss, 4),
        _num(enc.get("actual_ratio"), 2),
        _num(enc.get("optimal_ratio"), 2),
        _num(dec.get("actual_ratio"), 2),
        _num(dec.get("optimal_ratio"), 2),
    ]


def format_table(rows: Sequence[Row]) -> str:
    """Fixed-width table, one line per row, a blank line before each baseline group."""
    body = [table_cells(r) for r in rows]
    return fixed_width_table(COLUMNS, KEY_COLUMNS, body, [r.config.is_baseline for r in rows])


def legend(device: torch.device, shapes: dict[str, BatchShape], head_chunk: dict[str, int]) -> str:
    """What the columns mean, and where the batches came from."""
    peak = "CUDA allocator peak" if device.type == "cuda" else "peak of the step's own allocations (trace)"
    text = (
        "ms: median step (training_step + backward + clip + SGD step); t/base: time / baseline time. "
        "saved MB: storages allocated in the forward and held by autograd for backward. "
        f"peak MB: {peak} above the step's start, parameter gradients excluded (grad MB: those gradients). "
        "saved×, peak×: baseline MB / this MB. loss: of the traced step. S, T: padded source and decoder steps. "
        "enc/dec act, opt: the paper's accounting of the encoder / decoder (normal/used, normal/optimal bits; the "
        f"encoder's stored slice included), initial weights. Sweep chunk (target steps): {head_chunk}; "
        f"the baselines' head: {attention_module.BASELINE_CHUNK}."
    )
    origins = "; ".join(f"{label}: {shape.origin}" for label, shape in shapes.items())
    return f"{text}\nBatches: {origins}."


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    """PASS/FAIL/SKIP lines for the issue's targets."""
    head = (
        f"Targets (issue 8, k={TARGET_BITS}, Emb+20H): accounting decoder >= 10x, encoder >= 5x (stated on "
        "trained weights; measured here on initial ones); step activation memory >= 5x below the baseline at "
        "Multi30K sizes, >= 30x at length 200; step time <= 3x the baseline on CPU:"
    )
    if not targets:
        return head + "\n  SKIP  no k=3 Emb+20H row measured"
    lines = [head]
    for t in targets:
        if t["passed"] is None:
            lines.append(f"  SKIP  {t['what']}: row or baseline missing or failed")
        else:
            verdict = "PASS" if t["passed"] else "FAIL"
            op = ">=" if t["kind"] == "min" else "<="
            lines.append(f"  {verdict}  {t['what']}: {t['value']:.2f}x (target {op} {t['threshold']:g}x)")
    return "\n".join(lines)


def write_json(
    path: Path,
    device: torch.device,
    args: argparse.Namespace,
    rows: Sequence[Row],
    targets: Sequence[dict[str, Any]],
    shapes: dict[str, BatchShape],
) -> None:
    """Write the results file (creating its directory)."""
    payload = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "memory_metric": "MemoryTrace: peak_excl_grad_bytes (CUDA: allocator peak) and saved_bytes",
        "head_chunk": {label: sweep_chunk(shape) for label, shape in shapes.items()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "batches": {
            label: {**shape.summary(), "src_lengths": list(shape.src_lengths), "tgt_lengths": list(shape.tgt_lengths)}
            for label, shape in shapes.items()
        },
        "rows": [r.to_json() for r in rows],
        "targets": list(targets),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ CLI
def parse_size(text: str) -> str:
    """argparse type for ``--sizes``: ``multi30k`` or a positive length."""
    if text == MULTI30K or (text.isdigit() and int(text) > 1):
        return text
    raise argparse.ArgumentTypeError(f"a size is {MULTI30K!r} or a length of at least 2, got {text!r}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the flags and fill unset sizes from the paper's preset or ``--small``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        help=f"{MULTI30K} (a batch of real Multi30K length pairs) and/or fixed lengths N (source and "
        "decoder steps) (default multi30k 200)",
    )
    p.add_argument("--cells", nargs="+", choices=sorted(CELL_NAMES), default=["gru", "lstm"])
    p.add_argument(
        "--bits",
        type=parse_bits,
        nargs="+",
        default=[TARGET_BITS],
        help="max_forget_bits of the reversible rows: 1 2 3 5 none (default 3)",
    )
    p.add_argument(
        "--context",
        choices=["slice", "emb", "emb+slice", "hidden"],
        default="emb+slice",
        help="attention memory of the reversible rows (default emb+slice)",
    )
    p.add_argument("--slice-dim", type=int, help="stored units per step of the reversible rows (default 20)")
    p.add_argument("--batch", type=int, help="sentence pairs per batch (default 64)")
    p.add_argument("--hidden", type=int, help="units, even (default 300)")
    p.add_argument("--emb", type=int, help="embedding size (default 300)")
    p.add_argument("--src-vocab", type=int, help="source vocabulary (default: Multi30K's English, 10214)")
    p.add_argument("--tgt-vocab", type=int, help="target vocabulary (default: Multi30K's German, 18726)")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="folder holding Multi30K's tok/ (default $REVRNN_DATA_DIR/multi30k; missing: built-in length histograms)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the bucketing and the token ids (default 0)")
    p.add_argument(
        "--head-chunk",
        type=int,
        help="diagnostic: target steps per head chunk (the sweep's: 4 up to 128 steps, else 8; the baselines' 8)",
    )
    p.add_argument("--repeats", type=int, help="timed steps per row after the warm-up and traced step (default 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads (default: torch's choice); 1 is steadier on a shared, busy CPU",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="JSON path (default benchmarks/results/nmt_step-<device>-<sizes>.json, -small appended with --small)",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="smoke preset: hidden 32, emb 32, slice 4, batch 8, vocab 300/400, sizes multi30k 30, 1 repeat, 1 thread",
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
        p.error("--hidden must be a positive even number (reversible cells split the state)")
    if "slice" in args.context and not 1 <= args.slice_dim <= args.hidden // 2:
        p.error(f"--slice-dim must be between 1 and hidden/2 = {args.hidden // 2} (the slice is taken from h1)")
    for name in ("batch", "emb", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("src_vocab", "tgt_vocab"):
        if getattr(args, name) is not None and getattr(args, name) <= len(SPECIALS):
            p.error(f"--{name.replace('_', '-')} must exceed the {len(SPECIALS)} special tokens")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.head_chunk is not None and args.head_chunk < 1:
        p.error("--head-chunk must be at least 1")
    assert set(args.bits) <= set(BITS_CHOICES)
    return args


def resolve_data(args: argparse.Namespace) -> dict[str, BatchShape]:
    """Fill the vocabulary sizes (from the training files, else Multi30K's) and build each size's lengths."""
    tok_dir = multi30k_dir(args.data_dir)
    if args.src_vocab is None or args.tgt_vocab is None:
        sentences = read_train_sentences(tok_dir)
        sizes = FALLBACK_VOCAB if sentences is None else (vocabulary_size(sentences[0]), vocabulary_size(sentences[1]))
        args.src_vocab = args.src_vocab or sizes[0]
        args.tgt_vocab = args.tgt_vocab or sizes[1]
    shapes: dict[str, BatchShape] = {}
    for size in args.sizes:
        shape = (
            multi30k_shape(tok_dir, args.batch, args.seed) if size == MULTI30K else fixed_shape(int(size), args.batch)
        )
        shapes[shape.label] = shape
    return shapes


def sweep_chunk(shape: BatchShape) -> int:
    """Target steps per chunk of the decoder's sweep for this batch shape (its padded decoder steps)."""
    return protocol.chunk_steps(shape.tgt_steps)


def set_head_chunk(chunk: int) -> None:
    """Diagnostic: the head's target steps per chunk, in the reverse sweep and in the baselines' chunked head."""
    protocol.CHUNK = protocol.LONG_CHUNK = chunk  # chunk_steps reads them at each call
    attention_module.BASELINE_CHUNK = chunk


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark, print the table and the targets, write the JSON; returns the rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.head_chunk is not None:
        set_head_chunk(args.head_chunk)
    shapes = resolve_data(args)
    if args.out is None:
        label = "+".join(shapes) + ("" if args.head_chunk is None else f"-chunk{args.head_chunk}")
        suffix = "-small" if args.small else ""  # a smoke run never overwrites the real results
        args.out = Path(__file__).resolve().parent / "results" / f"nmt_step-{device_slug(device)}-{label}{suffix}.json"
    configs = build_configs(args, list(shapes))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {len(configs)} "
        f"configurations, {args.repeats} timed round(s), vocab {args.src_vocab}/{args.tgt_vocab}",
        file=sys.stderr,
        flush=True,
    )
    rows = list(run_all(configs, shapes, device, args.repeats, args.seed))
    add_ratios(rows)
    targets = check_targets(rows, device)
    print(format_table(rows))
    print()
    print(legend(device, shapes, {label: sweep_chunk(shape) for label, shape in shapes.items()}))
    print()
    print(format_targets(targets))
    write_json(args.out, device, args, rows, targets, shapes)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
