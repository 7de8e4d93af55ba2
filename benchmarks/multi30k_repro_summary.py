"""Summarise the Multi30K reproduction run (benchmarks/multi30k_repro.sh): test2016 BLEU, memory, step time.

Per model (``--models``, default ``revgru gru``) it reads, under ``--root``:

* ``<model>/version_*/metrics.csv`` (the fit's CSVLogger): the last logged training loss, and
  ``memory_report.json`` beside it (the MemoryReport callback: medians over the measured training steps of the
  step's saved and peak bytes, and of the paper's accounting on the weights being trained);
* ``<model>-test/version_*/metrics.csv`` (``revrnn test``): ``test_bleu`` (multi-bleu on the lower-cased
  Moses-tokenised text, as the paper), ``test_bleu_detok`` (sacreBLEU 13a on detokenised text), ``test_ppl``;
* ``<model>/timing.json`` (written by the script): wall seconds of fit and test, and the step count.

For the reversible models it also computes the paper's accounting on the *trained* weights: the checkpoint's
model runs training-mode forwards over the first ``--accounting-batches`` Multi30K training batches (the
DataModule of the config: batch 64, ``max_len`` 50) and reports per side (encoder, decoder) the medians of
the actual ratio (normal/used bits) and optimal ratio (normal/optimal bits).

Writes ``results.md`` (the table) and ``results.json`` into ``--root`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import yaml

NAMES = {"revgru": "RevGRU", "revlstm": "RevLSTM", "gru": "GRU", "lstm": "LSTM"}
MEMORY_KEYS = ("saved_bytes", "peak_bytes", "peak_excl_grad_bytes", "actual_ratio", "optimal_ratio")


def newest(pattern: str) -> str | None:
    """The last path matching ``pattern`` in version order (``version_10`` after ``version_9``), or None."""

    def version(path: str) -> int:
        part = [p for p in path.split(os.sep) if p.startswith("version_")]
        return int(part[-1].removeprefix("version_")) if part and part[-1][8:].isdigit() else -1

    paths = sorted(glob.glob(pattern), key=version)
    return paths[-1] if paths else None


def read_csv(path: str | None) -> list[dict[str, str]]:
    """Rows of a CSVLogger ``metrics.csv`` (none when the file is missing)."""
    if path is None:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float | None:
    """The last non-empty value of ``key`` in a metrics table."""
    values = [float(r[key]) for r in rows if r.get(key)]
    return values[-1] if values else None


def memory_medians(fit_dir: str | None) -> dict[str, float]:
    """The MemoryReport summary (medians over measured steps) of a fit log folder, the keys of interest."""
    if fit_dir is None or not os.path.isfile(os.path.join(fit_dir, "memory_report.json")):
        return {}
    with open(os.path.join(fit_dir, "memory_report.json")) as f:
        summary = json.load(f)["summary"]
    out = {k: summary[f"memory/{k}"] for k in MEMORY_KEYS if f"memory/{k}" in summary}
    for side in ("encoder", "decoder"):
        for k in ("actual_ratio", "optimal_ratio"):
            if f"memory/{side}/{k}" in summary:
                out[f"{side}/{k}"] = summary[f"memory/{side}/{k}"]
    return out


def trained_accounting(ckpt: str, batches: int) -> dict[str, dict[str, float]] | None:
    """Per side, medians of the paper's ratios on the checkpoint's weights over the first ``batches`` training
    batches (training mode: dropout on, as the accounting of training windows); None for baselines."""
    from lightning_revrnn.datamodules import Multi30KDataModule
    from lightning_revrnn.translation.model import TranslationModel

    model = TranslationModel.load_from_checkpoint(ckpt, map_location="cpu")
    if not model.reversible:
        return None
    data = Multi30KDataModule(batch_size=64, max_len=50, download=False)
    data.setup("fit")
    model.train()
    ratios: dict[str, dict[str, list[float]]] = {}
    torch.manual_seed(0)
    for _, batch in zip(range(batches), data.train_dataloader()):
        with torch.enable_grad():
            model.summed_loss(batch)
        for side, stats in (model.memory_summary() or {}).items():
            for key, value in stats.items():
                ratios.setdefault(side, {}).setdefault(key, []).append(value)
    return {side: {k: statistics.median(v) for k, v in keys.items()} for side, keys in ratios.items()}


def summarise(root: str, model: str, accounting_batches: int) -> dict[str, Any]:
    """Everything the table shows for one model."""
    fit_csv = newest(os.path.join(root, model, "version_*", "metrics.csv"))
    fit_dir = os.path.dirname(fit_csv) if fit_csv else None
    test_rows = read_csv(newest(os.path.join(root, f"{model}-test", "version_*", "metrics.csv")))
    fit_rows = read_csv(fit_csv)
    timing_path = os.path.join(root, model, "timing.json")
    timing: dict[str, Any] = {}
    if os.path.isfile(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
    ckpt = os.path.join(fit_dir, "checkpoints", "last.ckpt") if fit_dir else None
    steps = timing.get("steps")
    result: dict[str, Any] = {
        "model": NAMES.get(model, model),
        "steps": steps,
        "fit_seconds": timing.get("fit_seconds"),
        "test_seconds": timing.get("test_seconds"),
        "seconds_per_step": (timing["fit_seconds"] / steps) if steps and "fit_seconds" in timing else None,
        "last_train_loss": last_value(fit_rows, "train_loss"),
        "val_ppl": last_value(fit_rows, "val_ppl"),
        "test_bleu": last_value(test_rows, "test_bleu"),
        "test_bleu_detok": last_value(test_rows, "test_bleu_detok"),
        "test_ppl": last_value(test_rows, "test_ppl"),
        "measured_memory": memory_medians(fit_dir),
        "trained_accounting": None,
        "checkpoint": ckpt,
        "optimizer": optimizer_of(fit_dir),
    }
    if ckpt is not None and os.path.isfile(ckpt) and accounting_batches > 0:
        result["trained_accounting"] = trained_accounting(ckpt, accounting_batches)
    return result


def optimizer_of(fit_dir: str | None) -> str | None:
    """The optimiser the fit used, from the CLI's saved ``config.yaml``: e.g. ``SGD(lr=0.2)``."""
    path = os.path.join(fit_dir, "config.yaml") if fit_dir else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        config = yaml.safe_load(f)
    spec = (config.get("model") or {}).get("init_args", {}).get("optimizer") or {}
    if "class_path" not in spec:
        return None
    lr = (spec.get("init_args") or {}).get("lr")
    return f"{spec['class_path'].rsplit('.', 1)[-1]}(lr={lr})"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(runs: list[dict[str, Any]], context: dict[str, Any]) -> str:
    """The results table (one row per model) and how it was made."""
    head = (
        "| model | attention memory | steps | s/step (fit wall) | test2016 BLEU (tok., multi-bleu) | "
        "sacreBLEU 13a (detok.) | test ppl | saved MB/step | peak MB/step (excl. grad) | "
        "encoder actual / optimal | decoder actual / optimal |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        mem, acc = r["measured_memory"], r["trained_accounting"] or {}
        enc, dec = acc.get("encoder", {}), acc.get("decoder", {})
        lines.append(
            f"| {r['model']} | {r.get('context', '-')} | {r['steps'] or '-'} | {_fmt(r['seconds_per_step'])} | "
            f"{_fmt(r['test_bleu'])} | {_fmt(r['test_bleu_detok'])} | {_fmt(r['test_ppl'], 1)} | "
            f"{_fmt(mem.get('saved_bytes', 0) / 1e6 if 'saved_bytes' in mem else None)} | "
            f"{_fmt(mem.get('peak_excl_grad_bytes', 0) / 1e6 if 'peak_excl_grad_bytes' in mem else None)} | "
            f"{_fmt(enc.get('actual_ratio'))} / {_fmt(enc.get('optimal_ratio'))} | "
            f"{_fmt(dec.get('actual_ratio'))} / {_fmt(dec.get('optimal_ratio'))} |"
        )
    optimizers = sorted({r["optimizer"] or "?" for r in runs})
    notes = [
        "",
        f"Command: `{context['command']}`. Both models trained the same {context['steps']} optimizer steps "
        f"(batch 64, optimiser {' / '.join(optimizers)}, the paper's dropout 0.4, clip 5), test on test2016 "
        f"(beam 5; test batches: "
        f"{context['test_batches']}).",
        "BLEU (tok.) is the paper's: multi-bleu on the lower-cased Moses-tokenised text; sacreBLEU 13a is on "
        "detokenised output. s/step: fit wall time / steps (includes start-up and the MemoryReport's traced "
        "steps). saved / peak MB: MemoryReport medians over the measured training steps. Accounting: the paper's "
        f"ratios on the trained weights, medians over {context['accounting_batches']} training batches.",
    ]
    return "\n".join(lines + notes) + "\n"


CONTEXTS = {"revgru": "Emb+20H, 3 bits", "revlstm": "Emb+20H, 3 bits", "gru": "300H", "lstm": "300H"}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="benchmarks/results/multi30k-repro")
    parser.add_argument("--models", nargs="+", default=["revgru", "gru"])
    parser.add_argument("--accounting-batches", type=int, default=10)
    parser.add_argument("--command", default="bash benchmarks/multi30k_repro.sh")
    parser.add_argument("--test-batches", default="all")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    runs = []
    for model in args.models:
        run = summarise(args.root, model, args.accounting_batches)
        run["context"] = CONTEXTS.get(model, "-")
        runs.append(run)
    steps = {r["steps"] for r in runs}
    context = {
        "command": args.command,
        "steps": steps.pop() if len(steps) == 1 else sorted(map(str, steps)),
        "test_batches": args.test_batches,
        "accounting_batches": args.accounting_batches,
    }
    table = markdown(runs, context)
    print(table)
    with open(os.path.join(args.root, "results.md"), "w") as f:
        f.write(f"# Multi30K reproduction (RevGRU Emb+20H vs GRU)\n\n{table}")
    with open(os.path.join(args.root, "results.json"), "w") as f:
        json.dump({**context, "runs": runs}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
