"""Buffer efficiency (optimal / used bits) of the library's buffer layout, beside an earlier layout's run.

Cases: a trained Multi30K translation model (encoder and decoder; ``--ckpt``), a trained PTB language model at
T 70 and T 1000 (``--lm-ckpt``), and random-weight LM-sized RNNs (input 650, hidden 1150, batch 20, 3 bits) at
T 70 and T 1000. Each case runs training-mode windows and reports medians over them of the actual ratio
(normal / used bits), the optimal ratio (normal / optimal bits) and the efficiency (optimal / used bits).
The figures are deterministic (integer arithmetic on fixed weights and data), so an earlier layout is compared
by running this same script against that version of the package (``PYTHONPATH=<old tree>``, ``--label``) and
passing its JSON as ``--before``: the table then shows both side by side. Prints a table and writes JSON.

Usage: ``python benchmarks/buffer_efficiency.py [--ckpt CKPT] [--lm-ckpt CKPT] [--batches 10] [--label NAME]
[--before JSON] [--out JSON]``. Trained rows are left out when their checkpoint is missing; they need
``REVRNN_DATA_DIR`` with ``multi30k/`` and ``ptb/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.core.accounting import MemoryAccounting

Row = dict[str, Any]


def medians(stats: list[MemoryAccounting]) -> dict[str, float]:
    return {
        "actual_ratio": statistics.median(s.actual_ratio for s in stats),
        "optimal_ratio": statistics.median(s.optimal_ratio for s in stats),
        "efficiency": statistics.median(s.efficiency for s in stats),
        "used_bits": statistics.median(s.used_bits for s in stats),
        "windows": len(stats),
    }


def random_rnn_rows(batches: int) -> list[Row]:
    """LM-sized RNNs with random weights, T 70 and 1000."""
    rows = []
    for cls in (RevGRU, RevLSTM):
        for T in (70, 1000):
            torch.manual_seed(0)
            rnn = cls(650, 1150, 1, max_forget_bits=3)
            stats = []
            for _ in range(max(1, batches // (5 if T == 1000 else 1))):
                rnn(torch.randn(T, 20, 650, requires_grad=True))
                stats.append(rnn.memory_stats())
            rows.append({"case": f"{cls.__name__} random weights", "side": "-", "T": T, **medians(stats)})
    return rows


def translation_rows(ckpt: str, batches: int) -> list[Row]:
    """The checkpoint's encoder and decoder on the first Multi30K training batches (training mode)."""
    from lightning_revrnn.datamodules import Multi30KDataModule
    from lightning_revrnn.translation.model import TranslationModel

    model = TranslationModel.load_from_checkpoint(ckpt, map_location="cpu")
    model.train()
    data = Multi30KDataModule(batch_size=64, max_len=50, download=False)
    data.setup("fit")
    per_side: dict[str, list[MemoryAccounting]] = {}
    torch.manual_seed(0)
    for _, batch in zip(range(batches), data.train_dataloader()):
        model.summed_loss(batch)
        stats = model.memory_stats()
        assert stats is not None, "a reversible checkpoint"
        for side, s in stats.sides():
            per_side.setdefault(side, []).append(s)
    case = f"Multi30K {model.hparams['rnn']} trained"
    return [{"case": case, "side": side, "T": "Multi30K", **medians(s)} for side, s in per_side.items()]


def _lm_windows(model: Any, bptt: int, batches: int) -> Iterator[MemoryAccounting]:
    """Training-mode windows of the PTB training stream, the state carried from window to window."""
    from lightning_revrnn.datamodules import PTBDataModule

    data = PTBDataModule(batch_size=20, bptt=bptt, download=False)
    data.setup("fit")
    hx = None
    torch.manual_seed(0)
    for _, batch in zip(range(batches), data.train_dataloader()):
        stem, head = model.stem.bind(training=True), model.head.bind(batch["targets"], training=True)
        _, h_n = model.window_loss(batch["inputs"], hx, stem, head)
        hx = model.rnn.exact_state(h_n)
        stats = model.memory_stats()
        assert stats is not None, "a reversible checkpoint"
        yield stats


def lm_rows(ckpt: str, batches: int) -> list[Row]:
    """The checkpoint's language model on PTB's first training windows, T 70 and T 1000."""
    from lightning_revrnn.lm.model import LanguageModel

    model = LanguageModel.load_from_checkpoint(ckpt, map_location="cpu")
    model.train()
    case = f"PTB {model.hparams['rnn']} trained"
    rows = []
    for T in (70, 1000):
        stats = list(_lm_windows(model, T, max(1, batches // (5 if T == 1000 else 1))))
        rows.append({"case": case, "side": "-", "T": T, **medians(stats)})
    return rows


def table(rows: list[Row], before: list[Row], labels: tuple[str, str]) -> str:
    """One line per case: the earlier layout's figures (when given) beside this run's, then the layouts' names."""
    old = {(r["case"], r["side"], str(r["T"])): r for r in before}
    head, rule = "| case | side | T | optimal ratio |", "|---|---|---|---|"
    if before:
        head, rule = head + " actual ratio before | efficiency before |", rule + "---|---|"
    lines = [head + " actual ratio | efficiency |", rule + "---|---|"]
    for r in rows:
        line = f"| {r['case']} | {r['side']} | {r['T']} | {r['optimal_ratio']:.2f} |"
        if before:
            b = old.get((r["case"], r["side"], str(r["T"])))
            line += " - | - |" if b is None else f" {b['actual_ratio']:.2f} | {b['efficiency']:.2f} |"
        lines.append(line + f" {r['actual_ratio']:.2f} | {r['efficiency']:.2f} |")
    if before:
        lines.append(f"\nbefore: {labels[0]}; after: {labels[1]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="benchmarks/results/multi30k-epochs/revgru/checkpoints/last.ckpt")
    parser.add_argument("--lm-ckpt", default="benchmarks/results/ptb-revgru-600/last.ckpt")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--label", default="per-unit slots, bit-packed words")
    parser.add_argument("--before", help="JSON of an earlier layout's run of this script")
    parser.add_argument("--out", default="benchmarks/results/buffer-efficiency-cpu.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = translation_rows(args.ckpt, args.batches) if os.path.isfile(args.ckpt) else []
    rows += lm_rows(args.lm_ckpt, args.batches) if os.path.isfile(args.lm_ckpt) else []
    rows += random_rnn_rows(args.batches)
    before: dict[str, Any] = {"label": "", "rows": []}
    if args.before:
        with open(args.before) as f:
            before = json.load(f)
    print(table(rows, before["rows"], (before["label"], args.label)))
    result = {"label": args.label, "ckpt": args.ckpt, "lm_ckpt": args.lm_ckpt, "batches": args.batches, "rows": rows}
    if args.before:
        result["before"] = before
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
