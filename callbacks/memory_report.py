"""MemoryReport: what each training step really keeps for backward, next to the paper's accounting."""

from __future__ import annotations

import json
import os
import statistics
from contextlib import AbstractContextManager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_revrnn.memory import SavedBytes, saved_tensor_bytes

#: Accounting fields summed over ranks (bits and counts); ratios are recomputed from the sums.
SUMMED = ("normal_bits", "used_bits", "optimal_bits", "drains")
PREFIX = "memory/"


class MemoryReport(Callback):
    r"""Measure the activation memory of every training step and log it with the paper's accounting.

    Measured memory (``memory/activation_bytes``), per rank and averaged over ranks:

    - CUDA: peak allocated during the step minus allocated at its start (the callback resets the peak
      at each step start, so it owns the peak statistics);
    - CPU: bytes autograd saves for backward during the forward (``saved_tensors_hooks``), counted once per
      storage, parameters excluded. For reversible models this includes the information buffer, which
      the reverse sweep saves for backward.

    Paper accounting (spec section 4), from ``pl_module.memory_stats()`` when the module has one (the
    reversible models; absent for the baselines), summed over ranks: ``memory/normal_bits``,
    ``memory/used_bits``, ``memory/optimal_bits``, ``memory/drains``, and the ratios
    ``memory/actual_ratio`` (normal/used) and ``memory/optimal_ratio`` (normal/optimal); per layer the same
    under ``memory/layer{l}/``.

    At the end of fit, rank zero prints a summary table and writes ``memory_report.json`` (summary plus
    every step) and ``memory_report.png`` (memory and ratio over training) into the trainer's log
    directory (``trainer.log_dir``, else ``default_root_dir``).

    Args:
        plot: write the PNG plot (needs matplotlib).
    """

    def __init__(self, plot: bool = True) -> None:
        super().__init__()
        self.plot = plot
        self.history: list[dict[str, float]] = []
        self._context: AbstractContextManager[SavedBytes] | None = None
        self._saved: SavedBytes | None = None
        self._cpu_bytes: int | None = None
        self._cuda_start = 0

    # ------------------------------------------------------------------------------ measurement hooks
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        device = pl_module.device
        self._cpu_bytes = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self._cuda_start = torch.cuda.memory_allocated(device)
        else:
            self._context = saved_tensor_bytes(pl_module.parameters())
            self._saved = self._context.__enter__()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._close()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        device = pl_module.device
        if device.type == "cuda":
            measured = float(torch.cuda.max_memory_allocated(device) - self._cuda_start)
        else:
            measured = float(self._cpu_bytes or 0)
        metrics = {f"{PREFIX}activation_bytes": self._mean_over_ranks(trainer, measured, device)}
        memory_stats = getattr(pl_module, "memory_stats", None)
        stats = memory_stats() if callable(memory_stats) else None
        if stats is not None:
            metrics.update(self._accounting(trainer, stats, device))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if trainer.is_global_zero:
            self.history.append({"step": float(trainer.global_step), **metrics})

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            assert self._saved is not None
            self._cpu_bytes = self._saved.total
            self._context = self._saved = None

    # ------------------------------------------------------------------------------------- reduction
    @staticmethod
    def _mean_over_ranks(trainer: pl.Trainer, value: float, device: torch.device) -> float:
        t = torch.tensor(value, dtype=torch.float64, device=device)
        return float(trainer.strategy.reduce(t, reduce_op="mean"))

    @staticmethod
    def _accounting(trainer: pl.Trainer, stats: dict[str, Any], device: torch.device) -> dict[str, float]:
        layers = stats.get("layers", [])
        rows = [("", stats)] + [(f"layer{l}/", s) for l, s in enumerate(layers)]
        values = torch.tensor([[float(s[k]) for k in SUMMED] for _, s in rows], dtype=torch.float64, device=device)
        values = trainer.strategy.reduce(values, reduce_op="sum").cpu()
        out: dict[str, float] = {}
        for (prefix, _), row in zip(rows, values.tolist()):
            fields = dict(zip(SUMMED, row))
            fields["actual_ratio"] = _ratio(fields["normal_bits"], fields["used_bits"])
            fields["optimal_ratio"] = _ratio(fields["normal_bits"], fields["optimal_bits"])
            out.update({f"{PREFIX}{prefix}{k}": v for k, v in fields.items()})
        return out

    # ---------------------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, float]:
        """Medians over the recorded steps of every logged quantity (``step`` excluded)."""
        keys = sorted({k for row in self.history for k in row if k != "step"})
        return {k: statistics.median(row[k] for row in self.history if k in row) for k in keys}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        summary = self.summary()
        lines = ["MemoryReport (median over training steps)"]
        lines += [f"  {k[len(PREFIX):]:<28} {v:>16,.2f}" for k, v in summary.items() if "/layer" not in k]
        rank_zero_info("\n".join(lines))
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "memory_report.json"), "w") as f:
            json.dump({"summary": summary, "steps": self.history}, f, indent=1)
        if self.plot:
            self._plot(os.path.join(folder, "memory_report.png"))

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [row["step"] for row in self.history]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps, [row[f"{PREFIX}activation_bytes"] / 2**20 for row in self.history], label="activation MiB")
        ax.set_xlabel("global step")
        ax.set_ylabel("measured activation memory (MiB)")
        if any(f"{PREFIX}actual_ratio" in row for row in self.history):
            ax2 = ax.twinx()
            ax2.plot(steps, [row.get(f"{PREFIX}actual_ratio", float("nan")) for row in self.history], "C1",
                     label="actual ratio")
            ax2.set_ylabel("paper ratio normal/used")
        ax.set_title("MemoryReport")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")
