"""The paper's memory accounting on *trained* weights (random weights forget little).

Loads a reversible LanguageModel checkpoint (by default the PTB reproduction run's RevGRU), runs training-mode
forwards over the first ``--windows`` PTB training windows for each forgetting limit ``k`` and reports
``memory_stats()`` medians: normal/used/optimal bits, actual and optimal ratios, efficiency. The weights were
trained with the checkpoint's own ``k`` (3 in the reproduction run); rows at other ``k`` reuse those weights
with a different limit, an approximation of a model trained at that ``k``. Writes JSON next to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import warnings
from collections.abc import Sequence

import torch

from lightning_revrnn import ReversibleCell, ReversibleRNN
from lightning_revrnn.datamodules import PTBDataModule
from lightning_revrnn.lm import LanguageModel

KEYS = ("actual_ratio", "optimal_ratio", "efficiency", "normal_bits", "used_bits", "optimal_bits")


def _number(value: object) -> float:
    """One figure of ``MemoryAccounting.as_dict()`` (the KEYS are all numbers)."""
    assert isinstance(value, (int, float))
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="benchmarks/results/ptb-repro/ptb-revgru/version_0/checkpoints/last.ckpt")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/trained-accounting.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = LanguageModel.load_from_checkpoint(args.ckpt, map_location="cpu")
    model.log = lambda *a, **k: None  # type: ignore[method-assign]  # logging off: steps run outside a Trainer
    data = PTBDataModule(batch_size=20, bptt=70)
    data.setup("fit")
    batches = [b for _, b in zip(range(args.windows), data.train_dataloader())]
    rows = []
    for k in (2, 3, 5, None):
        assert isinstance(model.rnn, ReversibleRNN)  # a reversible checkpoint: its cells hold the budget
        for cell in model.rnn.cells:
            assert isinstance(cell, ReversibleCell)
            cell.max_forget_bits = k
        stats: list[dict[str, object]] = []
        model.train()
        for batch in batches:
            model.training_step(batch, 0)  # forward only; the graph is dropped
            accounting = model.memory_stats()
            assert accounting is not None  # a reversible model after a training step
            stats.append(accounting.as_dict())
        row = {"max_forget_bits": k, **{key: statistics.median(_number(s[key]) for s in stats) for key in KEYS}}
        rows.append(row)
        print(
            f"k={k!s:>4}  actual {row['actual_ratio']:6.2f}x  optimal {row['optimal_ratio']:6.2f}x  "
            f"efficiency {row['efficiency']:.3f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "checkpoint": args.ckpt,
                "trained_k": model.hparams["max_forget_bits"],
                "windows": args.windows,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
