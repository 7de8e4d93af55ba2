"""MemoryReport: what a training step really allocates and keeps for backward, next to the paper's accounting."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.rnn import ReversibleRNN
from lightning_revrnn.memory import MemoryTrace, StepMemory, profiler_busy

PREFIX = "memory/"
#: Measured bytes, reduced over ranks by max (the largest rank is what must fit on a device).
MEASURED = ("peak_bytes", "grad_bytes", "peak_excl_grad_bytes", "saved_bytes")
#: Accounting fields summed over windows and ranks (then a window count); the ratios are those of the sums.
SUMMED = ("normal_bits", "used_bits", "optimal_bits", "stored_bits", "drains", "multiplications")
#: Accounting keys logged, per module and layer and in total.
LOGGED = (
    "normal_bits",
    "used_bits",
    "optimal_bits",
    "stored_bits",
    "drains",
    "windows",
    "actual_ratio",
    "optimal_ratio",
)
DEFAULT_EVERY_N_STEPS = 50


class MemoryReport(Callback):
    r"""Measure the memory of training steps and log it, with the paper's accounting of every reversible module.

    Works with any LightningModule, on CPU and CUDA, single process or DDP. Every ``every_n_steps``
    optimizer steps, one optimizer step (all its micro-batches under ``accumulate_grad_batches``: forward
    and backward, up to the optimizer's update) is traced with ``torch.profiler`` (allocations and frees,
    see :mod:`lightning_revrnn.memory`), and one point is logged per measured optimizer step.

    Logged keys (``trainer.global_step`` after the step; measured bytes reduced over ranks by **max**,
    accounting reduced over ranks by **sum**):

    ==========================================  ==========  ===============================================
    key                                         unit        meaning
    ==========================================  ==========  ===============================================
    ``memory/peak_bytes``                       bytes       peak allocation of the step above its start,
                                                            forward and backward together (CPU: from the
                                                            allocation trace; CUDA: the allocator's
                                                            ``max_memory_allocated``), gradients included
    ``memory/grad_bytes``                       bytes       parameter gradients allocated during the step
    ``memory/peak_excl_grad_bytes``             bytes       the same peak without those gradients: what the
                                                            step's activations and temporaries need
    ``memory/saved_bytes``                      bytes       storages allocated in the forward and saved by
                                                            autograd for backward (largest micro-batch);
                                                            views of pre-existing tensors (a batch sliced
                                                            from a corpus, parameters) count 0
    ``memory/normal_bits``                      bits        paper: what storing the hidden states would take
    ``memory/used_bits``                        bits        paper: what the information buffers (and stored
                                                            units) hold
    ``memory/optimal_bits``                     bits        paper: the information-theoretic floor
    ``memory/stored_bits``                      bits        stored units (attention slices), 32 per unit and
                                                            step; included in used and optimal bits
    ``memory/drains``                           count       buffer drains (32-bit planes pushed)
    ``memory/windows``                          count       training windows (forwards) accounted
    ``memory/actual_ratio``                     ratio       ``normal_bits / used_bits``
    ``memory/optimal_ratio``                    ratio       ``normal_bits / optimal_bits``
    ``memory/<module>/<field>``                 as above    the accounting fields of one reversible module,
                                                            by its qualified name (e.g. ``memory/rnn/...``)
    ``memory/<module>/layer<l>/<field>``        as above    the same for layer ``l`` of that module
    ==========================================  ==========  ===============================================

    The accounting keys appear only when the LightningModule contains reversible modules
    (:class:`~lightning_revrnn.core.rnn.ReversibleRNN` instances anywhere in ``pl_module.modules()``). Each
    training forward of such a module in a measured step is one window; the step's figures are the sums
    over its windows (micro-batches included) and over ranks.

    At the end of fit, rank zero prints a summary (medians over the measured steps, headed by the LightningModule's
    class and its reversible modules) and writes ``memory_report.json`` (summary plus every measured step) and
    ``memory_report.png`` into ``dirpath``, by default the log directory of the fit (``trainer.log_dir``, where the
    fit's logger writes its metrics, else ``default_root_dir``), records that folder in :attr:`report_dir` and says
    where it wrote them.

    Where to find it after ``strategy="ddp_spawn"`` (or any spawn/fork-based strategy): the fit runs in worker
    processes, so the main process's MemoryReport object stays empty (no :attr:`history`, no
    :attr:`report_dir`), and Lightning resolves the logger's version anew in the main process when it is first
    asked for, after the workers created theirs: ``trainer.log_dir`` there names the *next* version
    (``version_1``) while the fit's metrics, checkpoints and this report are in ``version_0``. Pass ``dirpath``
    to know the folder in every process (or fix the logger's ``version``).

    Args:
        every_n_steps: measure the optimizer steps whose number (``trainer.global_step`` after the step) is a
            multiple of this. Default ``None``: the trainer's ``log_every_n_steps`` (50 unless set), so
            each measurement reaches the logger. A traced step takes about 2-4x as long as an untraced one
            (the profiler records every op; measured for the LM at T 70 on CPU and an H200), so the default
            costs a few percent; unmeasured steps cost nothing.
        plot: write the PNG (needs matplotlib).
        dirpath: the folder for ``memory_report.json`` / ``.png`` (created if missing), the same in every
            process and strategy. Default ``None``: the fit's log directory (see above).
    """

    def __init__(
        self, every_n_steps: int | None = None, plot: bool = True, dirpath: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1 (or None for log_every_n_steps), got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.plot = plot
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.report_dir: str | None = None
        """The folder the report was written to: set at the end of fit on rank 0 of the process that trained."""
        self.history: list[dict[str, float]] = []
        self._trace: MemoryTrace | None = None
        self._measured: StepMemory | None = None
        self._modules: list[tuple[str, ReversibleRNN]] = []
        self._handles: list[RemovableHandle] = []
        self._windows: dict[str, list[MemoryAccounting]] = {}
        self._micro_batches = 0
        self._warned_busy = False

    # --------------------------------------------------------------------------------- set-up / tear-down
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._modules = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, ReversibleRNN)]
        for name, module in self._modules:
            self._handles.append(module.register_forward_hook(self._accounting_hook(name)))

    def _accounting_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._trace is not None and module.training and torch.is_grad_enabled() and _requires_grad(output):
                assert isinstance(module, ReversibleRNN)
                self._windows.setdefault(name, []).append(module.memory_stats())

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _period(self, trainer: pl.Trainer) -> int:
        if self.every_n_steps is not None:
            return self.every_n_steps
        period: int | None = getattr(trainer, "log_every_n_steps", None)  # not in Trainer's annotations
        return period or DEFAULT_EVERY_N_STEPS

    # ------------------------------------------------------------------------------ measurement hooks
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._trace is None and self._measured is None and (trainer.global_step + 1) % self._period(trainer) == 0:
            self._start(pl_module)
        if self._trace is not None:
            self._micro_batches += 1
            self._trace.begin_forward()

    def _start(self, pl_module: pl.LightningModule) -> None:
        if profiler_busy():  # the Trainer's own profiler (or the user's) is running: profilers cannot nest
            if not self._warned_busy:
                rank_zero_warn("MemoryReport skips steps traced by another torch profiler (profilers cannot nest).")
                self._warned_busy = True
            return  # every rank runs the same profiler configuration, so every rank skips alike
        self._windows, self._micro_batches = {}, 0
        self._trace = MemoryTrace(pl_module.device)
        self._trace.start()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._trace is not None:
            self._trace.end_forward()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._trace is not None:
            self._measured = self._trace.stop(pl_module.parameters())
            self._trace = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._trace is not None:
            self._trace.end_forward()  # a forward without backward; the step goes on
        if self._measured is None:
            return
        measured, self._measured = self._measured, None
        metrics = self._reduce_measured(trainer, measured, pl_module.device)
        metrics.update(self._reduce_accounting(trainer, pl_module.device))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if trainer.is_global_zero:
            self.history.append(
                {
                    "step": float(trainer.global_step),
                    **metrics,
                    "world_size": float(trainer.world_size),
                    "micro_batches": float(self._micro_batches),
                }
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._trace is not None:
            self._trace.abort()
            self._trace = None
        self._remove_hooks()

    # ------------------------------------------------------------------------------------- reduction
    @staticmethod
    def _reduce_measured(trainer: pl.Trainer, measured: StepMemory, device: torch.device) -> dict[str, float]:
        values = torch.tensor([float(getattr(measured, k)) for k in MEASURED], dtype=torch.float64, device=device)
        values = trainer.strategy.reduce(values, reduce_op="max").cpu()
        return {f"{PREFIX}{k}": v for k, v in zip(MEASURED, values.tolist())}

    def _reduce_accounting(self, trainer: pl.Trainer, device: torch.device) -> dict[str, float]:
        """Per module and layer, the step's windows summed; then summed over ranks (same shape on every rank:
        every rank has the same modules, a module without a window contributes zeros)."""
        if not self._modules:
            return {}
        rows: list[tuple[str, list[float]]] = []
        for name, module in self._modules:
            windows = self._windows.get(name, [])
            rows.append((f"{name}/", _summed(windows)))
            for l in range(module.num_layers):
                rows.append((f"{name}/layer{l}/", _summed([w.layers[l] for w in windows])))
        local = torch.tensor([r for _, r in rows], dtype=torch.float64, device=device)
        values: list[list[float]] = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        totals = [
            sum(values[i][j] for i, (prefix, _) in enumerate(rows) if "/layer" not in prefix)
            for j in range(len(SUMMED) + 1)
        ]
        out = _logged("", totals) if totals[-1] else {}
        for (prefix, _), row in zip(rows, values):
            if row[-1]:
                out.update(_logged(prefix, row))
        return out

    # ---------------------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, float]:
        """Medians over the measured steps of every logged quantity."""
        skip = {"step", "world_size", "micro_batches"}
        keys = sorted({k for row in self.history for k in row if k not in skip})
        return {k: statistics.median(row[k] for row in self.history if k in row) for k in keys}

    def summary_text(self, pl_module: pl.LightningModule, folder: str) -> str:
        """The summary printed at the end of fit: which model it measured (the LightningModule's class and its
        reversible modules), then the medians of the totals."""
        modules = ", ".join(f"{name}: {type(module).__name__}" for name, module in self._modules)
        lines = [
            f"MemoryReport of {type(pl_module).__name__} ({modules or 'no reversible module'}), median over "
            f"{len(self.history)} measured steps; written to {folder}"
        ]
        lines += [f"  {k[len(PREFIX) :]:<28} {v:>18,.2f}" for k, v in self.summary().items() if k.count("/") == 1]
        return "\n".join(lines)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trace is not None:  # fit ended inside a measured step (no optimizer step came)
            self._trace.abort()
            self._trace = None
        self._remove_hooks()
        # log_dir broadcasts: every rank must ask
        folder = self.dirpath if self.dirpath is not None else (trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        if not self.history:
            rank_zero_warn(
                f"MemoryReport measured no step: training ran {trainer.global_step} optimizer steps, "
                f"measuring every {self._period(trainer)}. Lower every_n_steps to get a report."
            )
            return
        summary = self.summary()
        rank_zero_info(self.summary_text(pl_module, folder))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "memory_report.json"), "w") as f:
            json.dump({"summary": summary, "steps": self.history}, f, indent=1)
        if self.plot:
            self._plot(os.path.join(folder, "memory_report.png"))
        self.report_dir = folder
        note = ""
        if self.dirpath is None and isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            note = (
                " (the main process's trainer.log_dir will name the logger's next version, not this folder: "
                "pass MemoryReport(dirpath=...) to choose it)"
            )
        rank_zero_info(f"MemoryReport wrote memory_report.json{' and .png' if self.plot else ''} to {folder}{note}")

    def _plot(self, path: str) -> None:
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def figure(self) -> Any:
        """The report's matplotlib figure: measured MiB per rank with the non-reversible reference line,
        and the paper's ratios (reversible modules only); one point per measured optimizer step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.history
        steps = [row["step"] for row in rows]
        reversible = any(f"{PREFIX}normal_bits" in row for row in rows)
        fig, axes = plt.subplots(2 if reversible else 1, 1, figsize=(7, 6 if reversible else 3.5), squeeze=False)
        ax = axes[0][0]
        for key, label in (
            ("peak_bytes", "peak above step start"),
            ("peak_excl_grad_bytes", "peak without gradients"),
            ("grad_bytes", "parameter gradients"),
            ("saved_bytes", "saved for backward"),
        ):
            ax.plot(steps, [row[PREFIX + key] / 2**20 for row in rows], marker="o", label=label)
        if reversible:
            # the paper's bits are summed over ranks and windows: per rank and micro-batch, like the peaks
            per = [max(row["world_size"] * row["micro_batches"], 1.0) for row in rows]
            normal = [row.get(f"{PREFIX}normal_bits", 0.0) / 8 / 2**20 / p for row, p in zip(rows, per)]
            used = [row.get(f"{PREFIX}used_bits", 0.0) / 8 / 2**20 / p for row, p in zip(rows, per)]
            ax.plot(steps, normal, "k--", label="non-reversible hidden states (normal bits)")
            ax.plot(steps, used, marker="x", label="reversible buffers (used bits)")
        ax.set_ylabel("MiB per rank")
        ax.set_title("MemoryReport: one point per measured optimizer step")
        if reversible:
            ax2 = axes[1][0]
            for key, label in (("actual_ratio", "normal / used bits"), ("optimal_ratio", "normal / optimal bits")):
                ax2.plot(steps, [row.get(PREFIX + key, float("nan")) for row in rows], marker="o", label=label)
            ax2.set_ylabel("memory ratio (paper)")
        for (a,) in axes:
            a.set_xlabel("optimizer step")
            a.set_xlim(left=0, right=max(steps) * 1.05 + 1)
            a.set_ylim(bottom=0)
            a.legend(fontsize="small")
        fig.tight_layout()
        return fig


def _requires_grad(output: Any) -> bool:
    first = output[0] if isinstance(output, (tuple, list)) else output
    return isinstance(first, Tensor) and first.requires_grad


def _summed(windows: list[MemoryAccounting]) -> list[float]:
    """The SUMMED fields of the windows' total, then their count."""
    total = MemoryAccounting.total(windows)
    return [*(float(getattr(total, k)) for k in SUMMED), float(len(windows))]


def _logged(prefix: str, row: list[float]) -> dict[str, float]:
    """The LOGGED keys of a reduced row (:func:`_summed`'s layout): its sums, window count and ratios."""
    summed = MemoryAccounting(**dict(zip(SUMMED, row)))  # type: ignore[arg-type]  # sums over ranks, as floats
    fields = {**summed.as_dict(), "windows": row[-1]}
    return {f"{PREFIX}{prefix}{k}": fields[k] for k in LOGGED}  # type: ignore[misc]  # numbers
