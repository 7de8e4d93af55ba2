"""Summarise the PTB reproduction run (benchmarks/ptb_repro.sh): validation perplexity curves and memory.

Reads ``benchmarks/results/ptb-repro/ptb-<model>/version_*/metrics.csv`` (CSVLogger), prints one table of
validation perplexity per evaluated step for every model side by side, the median measured activation
memory per training step and the paper accounting, and writes ``benchmarks/results/ptb-repro.json``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
from collections.abc import Sequence
from typing import TypedDict


class Run(TypedDict):
    """What :func:`read_run` reads from one model's CSV log."""

    log: str
    train_steps: int
    val_ppl: dict[int, float]
    memory_median: dict[str, float]


def read_run(folder: str) -> Run:
    """Validation curve and memory medians of the newest CSV log under ``folder``."""
    paths = sorted(glob.glob(os.path.join(folder, "version_*", "metrics.csv")))
    if not paths:
        raise FileNotFoundError(f"no metrics.csv under {folder}: run benchmarks/ptb_repro.sh first")
    with open(paths[-1]) as f:
        rows = list(csv.DictReader(f))
    curve = {int(r["step"]): float(r["val_ppl"]) for r in rows if r.get("val_ppl")}
    memory: dict[str, float] = {}
    for key in (
        "memory/activation_bytes",
        "memory/actual_ratio",
        "memory/optimal_ratio",
        "memory/used_bits",
        "memory/optimal_bits",
        "memory/normal_bits",
    ):
        values = [float(r[key]) for r in rows if r.get(key)]
        if values:
            memory[key.removeprefix("memory/")] = statistics.median(values)
    steps = max((int(r["step"]) for r in rows if r.get("train_loss")), default=0) + 1
    return {"log": paths[-1], "train_steps": steps, "val_ppl": curve, "memory_median": memory}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="benchmarks/results/ptb-repro")
    parser.add_argument("--models", nargs="+", default=["revgru", "gru"])
    parser.add_argument("--out", default="benchmarks/results/ptb-repro.json")
    args = parser.parse_args(argv)
    runs = {m: read_run(os.path.join(args.root, f"ptb-{m}")) for m in args.models}
    steps = sorted(set.intersection(*(set(r["val_ppl"]) for r in runs.values())))
    print(f"{'step':>6} " + " ".join(f"{m + ' val ppl':>16}" for m in args.models))
    for s in steps:
        print(f"{s:>6} " + " ".join(f"{runs[m]['val_ppl'][s]:>16.2f}" for m in args.models))
    base = runs[args.models[-1]]["memory_median"]["activation_bytes"]
    for m, r in runs.items():
        mem = r["memory_median"]
        line = f"{m}: {r['train_steps']} steps, activation {mem['activation_bytes'] / 2**20:.2f} MiB/step"
        line += f" ({base / mem['activation_bytes']:.1f}x less than {args.models[-1]})"
        if "actual_ratio" in mem:
            line += f", paper actual {mem['actual_ratio']:.1f}x, optimal {mem['optimal_ratio']:.1f}x"
        print(line)
    summary = {
        "command": "STEPS=600 VAL_EVERY=150 bash benchmarks/ptb_repro.sh  (REVRNN_DATA_DIR=../shared/data)",
        "common_val_steps": steps,
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
