"""The main job (``make demo``): a small reversible LM and its baseline on the embedded synthetic corpus.

Trains a 1-layer RevGRU (3 bits) language model and the same model around ``nn.GRU`` for the same
number of steps on a seeded Markov source whose entropy rate is known, then prints one table: validation
perplexity next to the source's optimum, measured memory per training step (bytes saved for backward, and the
step's peak without parameter gradients) with ratios to the baseline, and the paper's accounting. Needs no download; a couple of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_revrnn.callbacks import MemoryReport
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel, RnnType


def train(rnn: RnnType, args: argparse.Namespace) -> dict[str, Any]:
    """Fit one model; return its validation perplexity and MemoryReport summary."""
    pl.seed_everything(args.seed, verbose=False)
    data = SyntheticLMDataModule(
        vocab_size=args.vocab, train_tokens=args.train_tokens, batch_size=args.batch, bptt=args.bptt, seed=args.seed
    )
    data.prepare_data()
    data.setup("fit")
    model = LanguageModel(
        data.vocab_size, rnn=rnn, num_layers=1, emb_size=args.size, max_forget_bits=3,
        dropout_emb=0.0, dropout_input=0.1, dropout_hidden=0.0, dropout_output=0.1, dropconnect=0.0,
        optimizer=lambda p: torch.optim.Adam(p, lr=args.lr), seed=args.seed,
    )
    report = MemoryReport(every_n_steps=max(1, args.steps // 10), plot=True)  # ten measured steps per model
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, val_check_interval=None, check_val_every_n_epoch=1,
        gradient_clip_val=0.25, callbacks=[report], default_root_dir=os.path.join(args.out, rnn),
        enable_checkpointing=False, enable_model_summary=False, logger=pl.loggers.CSVLogger(args.out, name=rnn),
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    metrics = trainer.validate(model, data, verbose=False)[0]
    return {
        "rnn": rnn,
        "val_ppl": metrics["val_ppl"],
        "optimal_ppl": data.optimal_perplexity,
        "steps": trainer.global_step,
        **{k.removeprefix("memory/"): v for k, v in report.summary().items() if "/layer" not in k},
    }


def table(rows: list[dict[str, Any]]) -> str:
    """One table: perplexity vs optimum, measured memory per step (saved for backward, and the step's peak
    without parameter gradients) with its ratio to the baseline (the last row), and the paper's accounting."""
    base = rows[-1]
    head = (f"{'model':<8} {'val ppl':>8} {'optimum':>8} {'saved KiB':>10} {'vs base':>8} {'peak KiB':>9} "
            f"{'vs base':>8} {'paper actual':>13} {'paper optimal':>14} {'efficiency':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        acct = ("used_bits" in r) and r["used_bits"]
        lines.append(
            f"{r['rnn']:<8} {r['val_ppl']:>8.3f} {r['optimal_ppl']:>8.3f} {r['saved_bytes'] / 1024:>10.1f} "
            f"{base['saved_bytes'] / r['saved_bytes']:>7.1f}x {r['peak_excl_grad_bytes'] / 1024:>9.1f} "
            f"{base['peak_excl_grad_bytes'] / r['peak_excl_grad_bytes']:>7.1f}x "
            + (f"{r['actual_ratio']:>12.1f}x {r['optimal_ratio']:>13.1f}x {r['optimal_bits'] / r['used_bits']:>10.2f}"
               if acct else f"{'-':>13} {'-':>14} {'-':>10}")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--size", type=int, default=64, help="embedding = hidden size")
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--train-tokens", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_logs", help="logs, MemoryReport JSON/PNG and demo.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
    rows = [train(rnn, args) for rnn in ("revgru", "gru")]
    print("\n" + table(rows))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nwritten: {os.path.join(args.out, 'demo.json')}")


if __name__ == "__main__":
    main()
