"""The main job (``make demo``): small reversible models and their baselines on embedded synthetic tasks.

1. Language modelling: a 1-layer RevGRU (3 bits) language model and the same model around ``nn.GRU``,
   the same number of steps on a seeded Markov source whose entropy rate is known. Table: validation
   perplexity next to the source's optimum, measured memory per training step (bytes saved for backward,
   and the step's peak without parameter gradients) with ratios to the baseline, and the paper's accounting.
2. Translation: a RevGRU encoder-decoder with attention over Emb+slice (3 bits) and the ``nn.GRU``
   baseline with attention over the whole state, the same number of steps on the embedded reordering task
   (``SyntheticTranslationDataModule``). Table: test BLEU (beam 5), measured memory per step with ratios,
   and the paper's accounting per side (encoder with its stored slice, decoder).

Prints one line per model as it trains, then the two tables (models by name; memory figures are medians over
each model's measured steps and the same on every run). What training writes to stderr (Lightning's messages,
warnings, MemoryReport's summaries) goes to ``<out>/train.log``; logs, MemoryReport JSON/PNG and ``demo.json``
to ``--out``. Needs no download; one to two minutes on one CPU thread (``--threads``), also on busy cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_revrnn.callbacks import MemoryReport
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.datamodules.translation import SyntheticTranslationDataModule
from lightning_revrnn.lm import LanguageModel, RnnType
from lightning_revrnn.translation.model import RnnType as TranslationRnn
from lightning_revrnn.translation.model import TranslationModel

#: Lightning's loggers, whose messages (devices, "Trainer.fit stopped", MemoryReport's summary) go to the log file.
LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric")


def lm_name(rnn: str) -> str:
    """The language model's name in the table."""
    return "RevGRU LM, 3 bits" if rnn == "revgru" else "GRU LM (nn.GRU)"


def nmt_name(rnn: str, args: argparse.Namespace) -> str:
    """The translation model's name in the table: its cell and attention memory (the paper's notation)."""
    return f"RevGRU Emb+{args.slice_dim}H, 3 bits" if rnn == "revgru" else f"GRU {args.size}H (nn.GRU)"


def _trainer(args: argparse.Namespace, name: str, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer logging to ``<out>/<name>`` (CSV) unless ``kwargs`` say otherwise."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=os.path.join(args.out, name),
        logger=pl.loggers.CSVLogger(args.out, name=name),
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**options, **kwargs})


def train(rnn: RnnType, args: argparse.Namespace) -> dict[str, Any]:
    """Fit one model; return its validation perplexity and MemoryReport summary."""
    pl.seed_everything(args.seed, verbose=False)
    data = SyntheticLMDataModule(
        vocab_size=args.vocab, train_tokens=args.train_tokens, batch_size=args.batch, bptt=args.bptt, seed=args.seed
    )
    data.prepare_data()
    data.setup("fit")
    model = LanguageModel(
        data.vocab_size,
        rnn=rnn,
        num_layers=1,
        emb_size=args.size,
        max_forget_bits=3,
        dropout_emb=0.0,
        dropout_input=0.1,
        dropout_hidden=0.0,
        dropout_output=0.1,
        dropconnect=0.0,
        optimizer=lambda p: torch.optim.Adam(p, lr=args.lr),
        seed=args.seed,
    )
    report = MemoryReport(every_n_steps=max(1, args.steps // 10), plot=True)  # ten measured steps per model
    # validation once, after training (the table reports that one)
    trainer = _trainer(args, rnn, max_steps=args.steps, limit_val_batches=0, gradient_clip_val=0.25, callbacks=[report])
    trainer.fit(model, data)
    metrics = _trainer(args, rnn, logger=False).validate(model, data, verbose=False)[0]
    return {
        "rnn": rnn,
        "model": lm_name(rnn),
        "val_ppl": metrics["val_ppl"],
        "optimal_ppl": data.optimal_perplexity,
        "steps": trainer.global_step,
        **{k.removeprefix("memory/"): v for k, v in report.summary().items() if "/layer" not in k},
    }


def translate(rnn: TranslationRnn, args: argparse.Namespace) -> dict[str, Any]:
    """Fit one small attention seq2seq model on the synthetic reordering task; return its test BLEU and
    MemoryReport summary (per side for the reversible model)."""
    pl.seed_everything(args.seed, verbose=False)
    data = SyntheticTranslationDataModule(train_size=args.nmt_train, batch_size=args.nmt_batch, seed=args.seed)
    reversible = rnn.startswith("rev")
    model = TranslationModel(
        rnn,
        hidden_size=args.size,
        embedding_size=args.size,
        context="emb+slice" if reversible else "hidden",
        slice_dim=args.slice_dim,
        max_forget_bits=3,
        dropout=0.1,
        beam=5,
        optimizer=lambda p: torch.optim.Adam(p, lr=args.lr),
    )
    report = MemoryReport(every_n_steps=max(1, args.nmt_steps // 10), plot=False)
    trainer = _trainer(
        args, f"nmt-{rnn}", max_steps=args.nmt_steps, limit_val_batches=0, gradient_clip_val=5.0, callbacks=[report]
    )
    trainer.fit(model, data)
    metrics = trainer.test(model, data, verbose=False)[0]
    summary = {k.removeprefix("memory/"): v for k, v in report.summary().items() if "/layer" not in k}
    return {
        "rnn": rnn,
        "model": nmt_name(rnn, args),
        "test_bleu": metrics["test_bleu"],
        "steps": trainer.global_step,
        **summary,
    }


#: Width of the model column.
NAME = 22


def _ratio(base: dict[str, Any], row: dict[str, Any], key: str) -> str:
    return f"{base[key] / row[key]:>7.1f}x"


def translation_table(rows: list[dict[str, Any]]) -> str:
    """Test BLEU, measured memory per step with ratios to the baseline (the last row), and the paper's
    accounting per side (actual / optimal ratio; the encoder's counts its stored slice)."""
    base = rows[-1]
    head = (
        f"{'model':<{NAME}} {'test BLEU':>9} {'saved KiB':>10} {'vs GRU':>8} {'peak KiB':>9} {'vs GRU':>8} "
        f"{'encoder actual/optimal':>23} {'decoder actual/optimal':>23}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        sides = [
            f"{r[f'{side}/actual_ratio']:.1f}x / {r[f'{side}/optimal_ratio']:.1f}x"
            if f"{side}/actual_ratio" in r
            else "-"
            for side in ("encoder", "decoder")
        ]
        lines.append(
            f"{r['model']:<{NAME}} {r['test_bleu']:>9.1f} {r['saved_bytes'] / 1024:>10.1f} "
            f"{_ratio(base, r, 'saved_bytes')} {r['peak_excl_grad_bytes'] / 1024:>9.1f} "
            f"{_ratio(base, r, 'peak_excl_grad_bytes')} {sides[0]:>23} {sides[1]:>23}"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    """One table: perplexity vs optimum, measured memory per step (saved for backward, and the step's peak
    without parameter gradients) with its ratio to the baseline (the last row), and the paper's accounting."""
    base = rows[-1]
    head = (
        f"{'model':<{NAME}} {'val ppl':>8} {'optimum':>8} {'saved KiB':>10} {'vs GRU':>8} {'peak KiB':>9} "
        f"{'vs GRU':>8} {'paper actual':>13} {'paper optimal':>14} {'efficiency':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        acct = ("used_bits" in r) and r["used_bits"]
        lines.append(
            f"{r['model']:<{NAME}} {r['val_ppl']:>8.3f} {r['optimal_ppl']:>8.3f} {r['saved_bytes'] / 1024:>10.1f} "
            f"{_ratio(base, r, 'saved_bytes')} {r['peak_excl_grad_bytes'] / 1024:>9.1f} "
            f"{_ratio(base, r, 'peak_excl_grad_bytes')} "
            + (
                f"{r['actual_ratio']:>12.1f}x {r['optimal_ratio']:>13.1f}x {r['optimal_bits'] / r['used_bits']:>10.2f}"
                if acct
                else f"{'-':>13} {'-':>14} {'-':>10}"
            )
        )
    return "\n".join(lines)


@contextmanager
def training_log(path: str) -> Iterator[None]:
    """Send what training writes to stderr to the file ``path``: C++ code's writes (file descriptor 2), Python's
    (``sys.stderr``: warnings) and Lightning's log messages. On an error, the file's end is shown."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved_handlers = [logger.handlers for logger in loggers]
    saved_stderr, saved_fd = sys.stderr, os.dup(2)
    saved_stderr.flush()
    failed = False
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = log
        for logger in loggers:
            logger.handlers = [logging.StreamHandler(log)]
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            log.flush()
            for logger, handlers in zip(loggers, saved_handlers):
                logger.handlers = handlers
            sys.stderr = saved_stderr
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            if failed:
                with open(path, encoding="utf-8", errors="replace") as f:
                    saved_stderr.write(f"--- the end of {path} ---\n{f.read()[-6000:]}\n")


def _run(step: str, name: str, steps: int, fit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Train one model (a line on stdout while it does) and return its row."""
    print(f"{step} {name:<{NAME}} {steps} steps ...", end="", flush=True)
    start = time.monotonic()
    row = fit()
    print(f" {time.monotonic() - start:4.0f} s", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--size", type=int, default=64, help="embedding = hidden size")
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--train-tokens", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--nmt-steps", type=int, default=150, help="training steps per translation model")
    parser.add_argument("--nmt-train", type=int, default=4000, help="synthetic training sentence pairs")
    parser.add_argument("--nmt-batch", type=int, default=32)
    parser.add_argument("--slice-dim", type=int, default=8, help="stored encoder units per step (Emb+slice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_logs", help="logs, MemoryReport JSON/PNG and demo.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; the models are small: one is as fast as two on idle cores, and much "
        "faster when other work shares them",
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> None:
    """Train the four models, print the tables, write ``demo.json``."""
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "train.log")
    count = 4 if args.nmt_steps > 0 else 2
    threads = args.threads
    print(
        f"Reversible RNNs and their nn.GRU baselines on embedded synthetic tasks ({threads} CPU "
        f"thread{'s' if threads != 1 else ''}); training messages: {log}"
    )
    with training_log(log):
        lm_rnns: tuple[RnnType, ...] = ("revgru", "gru")
        nmt_rnns: tuple[TranslationRnn, ...] = ("revgru", "gru")
        rows = [
            _run(f"[{i + 1}/{count}]", lm_name(rnn), args.steps, partial(train, rnn, args))
            for i, rnn in enumerate(lm_rnns)
        ]
        nmt_rows = (
            [
                _run(f"[{i + 3}/{count}]", nmt_name(rnn, args), args.nmt_steps, partial(translate, rnn, args))
                for i, rnn in enumerate(nmt_rnns)
            ]
            if args.nmt_steps > 0
            else []
        )
    print(
        f"\nLanguage modelling: a synthetic Markov source ({args.vocab} words), embedding = hidden = {args.size}, "
        f"{args.steps} steps\n" + table(rows)
    )
    if nmt_rows:
        print(
            f"\nTranslation with attention: the synthetic reordering task, embedding = hidden = {args.size}, "
            f"{args.nmt_steps} steps, test BLEU with beam 5\n" + translation_table(nmt_rows)
        )
    print(
        "\nMemory per training step: medians over each model's measured steps (MemoryReport), the same on every "
        "run.\nsaved: kept from forward for backward; peak: highest allocation above the step's start, without "
        "parameter\ngradients; vs GRU: the GRU's figure over the model's (above 1: less memory); paper: normal / "
        "used bits\n(actual), normal / optimal bits (optimal), optimal / used (efficiency)."
    )
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"lm": rows, "translation": nmt_rows}, f, indent=1)
    print(f"\nwritten: {os.path.join(args.out, 'demo.json')}")


if __name__ == "__main__":
    main()
