"""The floor under the reversible LM step's time: its matrix products alone, beside both whole steps.

The reversible method does more matrix products than the ``nn.*`` LM, whatever its elementwise code costs: the
head's logits GEMM runs twice (once for the forward's loss, once in the reverse sweep, which may not keep
``T x B x V`` logits), the input projections twice (forward and sweep), and the hidden GEMMs once more (the
reconstruction). This script measures that floor, and what it leaves everything else under a time target.

After a warm-up step, one training step of each model (:mod:`lm_step`'s models, sizes and batch) runs under
:class:`ProductRecorder`, a dispatch mode that records every matrix product (:data:`PRODUCTS`) with its operands'
shapes, strides and storages, in order, and counts every other op as :mod:`opcount` does (views, aliases and
allocations left out). :class:`ProductReplay` then runs recorded products alone, in the same order, on random
operands of the same shapes and strides; operands at one storage address in the step share one replay storage (a
weight read by every step stays one tensor; an address the step frees and reuses is reused too), so caches see
the step's reuse. The whole steps and the replays run in turns (``--repeats`` rounds after a warm-up); ratios
are taken within each round, and their median is reported with the rounds' range.

Replays: ``floor``, every product of the reversible step; ``head``, those with an operand of the vocabulary's
size (the decoder's), of the reversible step and of the ``nn.*`` step. The ``nn.*`` LSTM's recurrence is one
oneDNN op (``mkldnn_rnn_layer``) whose GEMMs cannot be replayed apart, so the ``nn.*`` step is measured whole; its
head's products are replayed for the head's ratio. Columns: both steps (ms), the floor (ms), the step and the
floor as ratios to the ``nn.*`` step (median, min-max), the head's products reversible vs ``nn.*``, the
reversible step's ops outside the products, its time outside them per such op (``(step - floor) / ops``: an upper
bound on an op's cost, since it also holds views, allocations, Python, and the products' colder caches in the
step), and what ``--target`` times the ``nn.*`` step would leave per op (``(target * nn.* step - floor) / ops``).

Usage::

    python benchmarks/gemm_floor.py                        # RevGRU and RevLSTM, T 70 and 1000
    python benchmarks/gemm_floor.py --cells lstm --seq-lens 70 --threads 1
    python benchmarks/gemm_floor.py --small                # smoke run, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

if __package__:  # python -m benchmarks.gemm_floor: the siblings import each other by their own names
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_step import Config, build_model, make_batch, step
from opcount import ALLOCATIONS, NO_OPS
from step_parts import add_common_arguments, finish_arguments, report

aten = torch.ops.aten
#: The matrix products a step may run (op packets, each with every overload; in-place packets listed apart).
PRODUCTS: frozenset[Any] = frozenset(
    {
        *(aten.mm, aten.addmm, aten.addmm_, aten._addmm_activation, aten.bmm, aten.baddbmm, aten.baddbmm_),
        *(aten.addbmm, aten.addbmm_, aten.mv, aten.addmv, aten.addmv_, aten.addr, aten.addr_, aten.dot, aten.vdot),
    }
)


@dataclass(frozen=True)
class Operand:
    """A tensor operand of a recorded product (``out=`` included): where it lies in its storage (key: the
    storage's address)."""

    storage: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Product:
    """One recorded matrix product: the op and its arguments, tensors as :class:`Operand`."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class ProductRecorder(TorchDispatchMode):
    """Records the matrix products run while active (:attr:`products`, in order) and counts every other op by name
    (:attr:`others`: views, aliases and allocations left out, as :mod:`opcount` counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[Product] = []
        self.others: Counter[str] = Counter()
        self.storage_bytes: dict[int, int] = {}

    @property
    def other_ops(self) -> int:
        """Op calls outside the products."""
        return sum(self.others.values())

    def _operand(self, t: Tensor) -> Operand:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        self.storage_bytes[key] = max(self.storage_bytes.get(key, 0), storage.nbytes())
        return Operand(key, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), t.dtype)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in PRODUCTS:
            spec = tuple(self._operand(a) if isinstance(a, Tensor) else a for a in args)
            named = {k: self._operand(v) if isinstance(v, Tensor) else v for k, v in kwargs.items()}  # out=
            self.products.append(Product(func, spec, named))
        elif not (func.is_view or packet in NO_OPS or packet in ALLOCATIONS):
            self.others[packet.__name__] += 1
        return func(*args, **kwargs)


class ProductReplay:
    """Runs recorded products alone (those ``keep`` selects, all by default), in order, on random operands laid
    out as recorded.

    Example::

        >>> w, x = torch.randn(6, 4), torch.randn(3, 4)
        >>> with ProductRecorder() as rec:
        ...     y = torch.addmm(torch.zeros(6), x, w.t()) @ w
        >>> [p.func.__name__ for p in rec.products], rec.other_ops  # zeros: one op outside the products
        (['addmm.default', 'mm.default'], 1)
        >>> replay = ProductReplay(rec)
        >>> replay.shapes() == [[(6,), (3, 4), (4, 6)], [(3, 6), (6, 4)]]
        True
        >>> replay.run()
    """

    def __init__(self, recorder: ProductRecorder, keep: Callable[[Product], bool] | None = None) -> None:
        self._storage_bytes = recorder.storage_bytes
        self.storages: dict[int, Tensor] = {}  # drawn at first use: only the kept products' storages
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
            (p.func, tuple(map(self._value, p.args)), {k: self._value(v) for k, v in p.kwargs.items()})
            for p in recorder.products
            if keep is None or keep(p)
        ]

    def _value(self, arg: Any) -> Any:
        """A recorded argument for the replay: an :class:`Operand` as a tensor in its replay storage."""
        return self._tensor(arg) if isinstance(arg, Operand) else arg

    def _tensor(self, operand: Operand) -> Tensor:
        if operand.dtype != torch.float32:
            raise ValueError(f"the replay draws float32 operands; a product read {operand.dtype}")
        storage = self.storages.get(operand.storage)
        if storage is None:
            storage = torch.empty(self._storage_bytes[operand.storage] // 4 + 1, dtype=torch.float32).normal_(0.0, 0.01)
            self.storages[operand.storage] = storage
        return storage.as_strided(operand.shape, operand.stride, operand.offset)

    def shapes(self) -> list[list[tuple[int, ...]]]:
        """Each call's tensor operands' shapes (``out=`` last)."""
        return [[tuple(a.shape) for a in (*args, *kw.values()) if isinstance(a, Tensor)] for _, args, kw in self.calls]

    def run(self) -> None:
        """Every product once, in the recorded order (outputs of out-of-place products allocated as in the step)."""
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)


def record_step(model: Any, batch: Any) -> ProductRecorder:
    """One training step (forward, ``backward()``, gradients cleared) under a :class:`ProductRecorder`."""
    with ProductRecorder() as recorder:
        step(model, batch)
    return recorder


def reads_size(size: int) -> Callable[[Product], bool]:
    """Selects the products with an operand of which one dimension is ``size`` (the vocabulary: the head's)."""
    return lambda p: any(isinstance(a, Operand) and size in a.shape for a in p.args)


def _seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_range(values: list[float]) -> tuple[float, list[float]]:
    return statistics.median(values), [min(values), max(values)]


def measure_group(cell: str, seq_len: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both models' steps and the product replays, in turns: per-round ratios (median, range) and what they leave."""
    sizes = dict(layers=1, seq_len=seq_len, batch=args.batch, vocab=args.vocab, emb=args.emb, hidden=args.hidden)
    device = torch.device("cpu")
    base_config, rev_config = Config(cell=cell, **sizes), Config(cell=cell, **sizes, variant="rev", bits=3)
    base, rev = build_model(base_config, device), build_model(rev_config, device)
    base_batch, rev_batch = make_batch(base_config, device), make_batch(rev_config, device)
    for model, batch in ((base, base_batch), (rev, rev_batch)):  # the first step's one-off work stays unrecorded
        step(model, batch)
    recorded, base_recorded = record_step(rev, rev_batch), record_step(base, base_batch)
    head = reads_size(args.vocab)
    runs: dict[str, Callable[[], None]] = {
        "baseline": lambda: step(base, base_batch),
        "reversible": lambda: step(rev, rev_batch),
        "floor": ProductReplay(recorded).run,
        "head": ProductReplay(recorded, head).run,
        "baseline_head": ProductReplay(base_recorded, head).run,
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            samples[name].append(_seconds(fn) * 1e3)
    ops = recorded.other_ops
    rounds = list(zip(samples["baseline"], samples["reversible"], samples["floor"]))
    step_ratio, step_range = _median_range([r / b for b, r, _ in rounds])
    floor_ratio, floor_range = _median_range([f / b for b, _, f in rounds])
    head_ratio, _ = _median_range([r / b for r, b in zip(samples["head"], samples["baseline_head"])])
    return {
        "cell": cell,
        "seq_len": seq_len,
        "median_ms": {name: statistics.median(s) for name, s in samples.items()},
        "products": len(recorded.products),
        "head_products": sum(map(head, recorded.products)),
        "baseline_head_products": sum(map(head, base_recorded.products)),
        "other_ops": ops,
        "step_ratio": step_ratio,
        "step_ratio_range": step_range,
        "floor_ratio": floor_ratio,
        "floor_ratio_range": floor_range,
        "head_ratio": head_ratio,
        "us_per_other_op": statistics.median((r - f) * 1e3 / ops for _, r, f in rounds),
        "us_per_other_op_at_target": statistics.median((args.target * b - f) * 1e3 / ops for b, _, f in rounds),
        "samples_ms": samples,
    }


def format_table(groups: Sequence[dict[str, Any]], target: float) -> str:
    """One line per (cell, T): ratios are per-round medians with the rounds' range."""
    lines = [
        f"{'cell':5} {'T':>5} {'nn.* ms':>8} {'rev ms':>8} {'floor ms':>8} {'rev/nn (range)':>17} "
        f"{'floor/nn (range)':>17} {'head':>5} {'other ops':>9} {'us/op':>6} {f'us/op at {target:g}x':>14}"
    ]
    for g in groups:
        ms = g["median_ms"]
        step_lo, step_hi = g["step_ratio_range"]
        floor_lo, floor_hi = g["floor_ratio_range"]
        lines.append(
            f"{g['cell']:5} {g['seq_len']:5d} {ms['baseline']:8.1f} {ms['reversible']:8.1f} {ms['floor']:8.1f} "
            f"{g['step_ratio']:5.2f} ({step_lo:4.2f}-{step_hi:4.2f}) {g['floor_ratio']:5.2f} ({floor_lo:4.2f}-"
            f"{floor_hi:4.2f}) {g['head_ratio']:5.2f} {g['other_ops']:9d} {g['us_per_other_op']:6.1f} "
            f"{g['us_per_other_op_at_target']:14.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measure every (cell, T), print the table, write the JSON; returns the groups."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, "gemm_floor")
    p.add_argument("--target", type=float, default=1.5, help="the time target, in nn.* steps (default 1.5)")
    args = finish_arguments(p, argv, "gemm_floor")
    if args.target <= 0:
        p.error("--target must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    groups = [measure_group(cell, t, args) for t in args.seq_lens for cell in args.cells]
    report(args, groups, format_table(groups, args.target))
    return groups


if __name__ == "__main__":
    main()
