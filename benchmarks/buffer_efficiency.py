"""Buffer efficiency (optimal / used bits) with the final words as 64-bit words and packed to their bytes, side by
side in one process, on trained Multi30K weights (encoder and decoder) and on random-weight LM-sized RNNs.

Each case runs the same training-mode windows twice: once with :meth:`InformationBuffer.packed_size` switched
off (the words stay int64: the layout before packing) and once as the library runs. Reports medians over the
windows of the actual ratio (normal / used bits), the optimal ratio (normal / optimal bits) and the efficiency
(optimal / used bits). Prints a table and writes JSON (``--out``).

Usage: ``python benchmarks/buffer_efficiency.py [--ckpt CKPT] [--batches 10] [--out JSON]``; ``--ckpt`` a
reversible ``TranslationModel`` checkpoint (default: the Multi30K-at-equal-epochs RevGRU's ``last.ckpt``; the
trained rows are left out when it is missing). Needs ``REVRNN_DATA_DIR`` with ``multi30k/`` for the trained rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lightning_revrnn import RevGRU, RevLSTM
from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.buffer import InformationBuffer

LAYOUTS = ("int64 words", "packed words")


@contextlib.contextmanager
def layout(name: str) -> Iterator[None]:
    """Run windows with the final words packed (the library) or kept as int64 words (packing switched off)."""
    if name == "packed words":
        yield
        return
    original = InformationBuffer.packed_size

    def unpacked(self: InformationBuffer) -> torch.Tensor:
        return self.word.new_zeros(0)

    InformationBuffer.packed_size = unpacked  # type: ignore[method-assign]  # the benchmark's switch
    try:
        yield
    finally:
        InformationBuffer.packed_size = original  # type: ignore[method-assign]


def medians(stats: list[MemoryAccounting]) -> dict[str, float]:
    return {
        "actual_ratio": statistics.median(s.actual_ratio for s in stats),
        "optimal_ratio": statistics.median(s.optimal_ratio for s in stats),
        "efficiency": statistics.median(s.efficiency for s in stats),
        "used_bits": statistics.median(s.used_bits for s in stats),
    }


def random_rnn_rows(batches: int) -> list[dict[str, Any]]:
    """LM-sized RNNs (input 650, hidden 1150, batch 20, 3 bits) with random weights, T 70 and 1000."""
    rows = []
    for cls in (RevGRU, RevLSTM):
        for T in (70, 1000):
            for name in LAYOUTS:
                torch.manual_seed(0)
                rnn = cls(650, 1150, 1, max_forget_bits=3)
                stats = []
                with layout(name):
                    for _ in range(max(1, batches // (5 if T == 1000 else 1))):
                        rnn(torch.randn(T, 20, 650, requires_grad=True))
                        stats.append(rnn.memory_stats())
                rows.append(
                    {"case": f"{cls.__name__} random weights", "side": "-", "T": T, "layout": name, **medians(stats)}
                )
    return rows


def trained_rows(ckpt: str, batches: int) -> list[dict[str, Any]]:
    """The checkpoint's encoder and decoder on the first Multi30K training batches (training mode)."""
    from lightning_revrnn.datamodules import Multi30KDataModule
    from lightning_revrnn.translation.model import TranslationModel

    model = TranslationModel.load_from_checkpoint(ckpt, map_location="cpu")
    model.train()
    data = Multi30KDataModule(batch_size=64, max_len=50, download=False)
    data.setup("fit")
    rows = []
    for name in LAYOUTS:
        per_side: dict[str, list[MemoryAccounting]] = {}
        torch.manual_seed(0)
        with layout(name):
            for _, batch in zip(range(batches), data.train_dataloader()):
                model.summed_loss(batch)
                stats = model.memory_stats()
                assert stats is not None, "a reversible checkpoint"
                for side, s in stats.sides():
                    per_side.setdefault(side, []).append(s)
        for side, stats_list in per_side.items():
            case = f"Multi30K {model.hparams['rnn']} trained"
            rows.append({"case": case, "side": side, "T": "Multi30K", "layout": name, **medians(stats_list)})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | side | T | layout | actual ratio | optimal ratio | efficiency |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float) -> str:
        return f"{value:.2f}"

    for r in rows:
        lines.append(
            f"| {r['case']} | {r['side']} | {r['T']} | {r['layout']} | {fmt(r['actual_ratio'])} | "
            f"{fmt(r['optimal_ratio'])} | {fmt(r['efficiency'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="benchmarks/results/multi30k-epochs/revgru/checkpoints/last.ckpt")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/buffer-efficiency-cpu.json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = trained_rows(args.ckpt, args.batches) if os.path.isfile(args.ckpt) else []
    rows += random_rnn_rows(args.batches)
    print(table(rows))
    with open(args.out, "w") as f:
        json.dump({"ckpt": args.ckpt, "batches": args.batches, "rows": rows}, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
