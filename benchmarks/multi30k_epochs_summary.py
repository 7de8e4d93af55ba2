"""Summarise Multi30K at equal epochs (benchmarks/multi30k_epochs.sh): validation BLEU per epoch, test2016 BLEU.

Per model (``--models``) it reads, under ``--root``:

* ``<model>/version_*/metrics.csv``: every fit invocation of the model (a resumed fit logs a new version), merged
  by epoch: ``val_bleu`` (greedy, all of val), ``val_ppl`` and the learning rate of each epoch;
* ``<model>/version_*/memory_report.json``: the MemoryReport medians (step peak without parameter gradients,
  bytes saved for backward), from the newest version that has one;
* ``<model>-test/version_*/metrics.csv``: ``test_bleu`` (multi-bleu on tokenised lower-cased text, as the
  paper), ``test_bleu_detok`` (sacreBLEU 13a), ``test_ppl`` of the last weights with beam 5;
* ``<model>/checkpoints/last.ckpt``: the paper's accounting on the trained weights, per side (reversible
  models).

It merges them into ``<root>/results.json`` (runs of models not summarised now are kept), writes ``results.md``
and plots validation BLEU per epoch for every model in ``results.json`` into ``val_bleu.png``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

from multi30k_repro_summary import NAMES, last_value, memory_medians, newest, read_csv, trained_accounting

ORDER = ["RevGRU", "GRU", "RevLSTM", "LSTM"]


def read_json(path: str, default: dict[str, Any]) -> dict[str, Any]:
    """The JSON object in ``path``, ``default`` when there is no such file."""
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return dict(json.load(f))


def per_epoch(root: str, model: str) -> dict[int, dict[str, float]]:
    """``{epoch: {val_bleu, val_ppl, lr}}`` over every fit version of ``model`` (a later version wins)."""
    epochs: dict[int, dict[str, float]] = {}
    versions = sorted(
        glob.glob(os.path.join(root, model, "version_*", "metrics.csv")),
        key=lambda p: int(p.split("version_")[-1].split(os.sep)[0]),
    )
    lr = None  # the learning rate last logged (LearningRateMonitor rows carry no epoch): that of the next epoch
    for path in versions:
        for row in read_csv(path):
            lr = next((float(v) for k, v in row.items() if k.startswith("lr-") and v), lr)
            if not row.get("epoch") or not row.get("val_bleu"):
                continue
            entry = epochs.setdefault(int(row["epoch"]), {})
            entry.update({key: float(row[key]) for key in ("val_bleu", "val_ppl") if row.get(key)})
            if lr is not None:
                entry["lr"] = lr
    return {e: v for e, v in sorted(epochs.items()) if "val_bleu" in v}


def summarise(root: str, model: str, accounting_batches: int) -> dict[str, Any]:
    """One model's row of ``results.json``."""
    epochs = per_epoch(root, model)
    test_rows = read_csv(newest(os.path.join(root, f"{model}-test", "version_*", "metrics.csv")))
    report = newest(os.path.join(root, model, "version_*", "memory_report.json"))
    memory = memory_medians(os.path.dirname(report)) if report else {}
    ckpt = os.path.join(root, model, "checkpoints", "last.ckpt")
    timing_path = os.path.join(root, model, "timing.json")
    timing = read_json(timing_path, {})
    val_bleu = [epochs[e]["val_bleu"] for e in sorted(epochs)]
    return {
        "model": NAMES.get(model, model),
        "epochs": len(val_bleu),
        "val_bleu": val_bleu,
        "val_ppl": [epochs[e].get("val_ppl") for e in sorted(epochs)],
        "lr": [epochs[e].get("lr") for e in sorted(epochs)],
        "best_val_bleu": max(val_bleu) if val_bleu else None,
        "test_bleu": last_value(test_rows, "test_bleu"),
        "test_bleu_detok": last_value(test_rows, "test_bleu_detok"),
        "test_ppl": last_value(test_rows, "test_ppl"),
        "memory": memory,
        "trained_accounting": (
            trained_accounting(ckpt, accounting_batches) if os.path.isfile(ckpt) and accounting_batches else None
        ),
        "timing": timing,
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(runs: list[dict[str, Any]], command: str) -> str:
    """One row per model, validation BLEU per epoch in the last column."""
    head = (
        "| model | epochs | test2016 BLEU (tok.) | sacreBLEU (detok.) | best val BLEU | val BLEU per epoch (greedy) | "
        "step peak MB (excl. grad) | decoder actual / optimal | encoder actual / optimal |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        acc = r.get("trained_accounting") or {}
        enc, dec = acc.get("encoder", {}), acc.get("decoder", {})
        peak = r["memory"].get("peak_excl_grad_bytes")
        lines.append(
            f"| {r['model']} | {r['epochs']} | {_fmt(r['test_bleu'])} | {_fmt(r['test_bleu_detok'])} | "
            f"{_fmt(r['best_val_bleu'])} | {', '.join(_fmt(b) for b in r['val_bleu'])} | "
            f"{_fmt(peak / 1e6 if peak else None)} | {_fmt(dec.get('actual_ratio'))} / "
            f"{_fmt(dec.get('optimal_ratio'))} | {_fmt(enc.get('actual_ratio'))} / {_fmt(enc.get('optimal_ratio'))} |"
        )
    lines += [
        "",
        f"Command: `{command}` (one pair at a time, one thread per model). Adam(lr 1e-3), batch 64, dropout 0.4, "
        "clip 5, lr x0.5 after an epoch without a val_ppl improvement; test2016 with beam 5 on the last weights. "
        "Accounting: the paper's ratios on the trained weights (medians over 10 training batches).",
    ]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Validation BLEU per epoch, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        style = "-" if r["model"].startswith("Rev") else "--"
        ax.plot(range(1, len(r["val_bleu"]) + 1), r["val_bleu"], style, marker="o", label=r["model"])
    ax.set_xticks(range(1, max((len(r["val_bleu"]) for r in runs), default=1) + 1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation BLEU (greedy, tokenised)")
    ax.set_title("Multi30K en→de: reversible vs baseline at equal epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="benchmarks/results/multi30k-epochs")
    parser.add_argument("--models", nargs="+", default=["revgru", "gru"])
    parser.add_argument("--accounting-batches", type=int, default=10)
    parser.add_argument("--command", default="bash benchmarks/multi30k_epochs.sh")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    path = os.path.join(args.root, "results.json")
    previous = read_json(path, {"runs": []})
    runs = {r["model"]: r for r in previous["runs"]}
    commands = dict(previous.get("commands", {}))
    for model in args.models:
        run = summarise(args.root, model, args.accounting_batches)
        runs[run["model"]] = run
        commands[run["model"]] = args.command
    ordered = sorted(runs.values(), key=lambda r: ORDER.index(r["model"]) if r["model"] in ORDER else 99)
    table = markdown(ordered, "; ".join(sorted(set(commands.values()))))
    print(table)
    with open(os.path.join(args.root, "results.md"), "w") as f:
        f.write(f"# Multi30K at equal epochs\n\n{table}")
    with open(path, "w") as f:
        json.dump({"commands": commands, "runs": ordered}, f, indent=2)
        f.write("\n")
    plot(ordered, os.path.join(args.root, "val_bleu.png"))


if __name__ == "__main__":
    main()
