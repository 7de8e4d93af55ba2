"""Count the ATen ops and the host-device synchronisations of a training step, per phase.

On a GPU every non-view ATen op is (at least) one kernel launch, and every host read of a device value
stalls the launch queue until the device catches up; at the reversible models' step sizes these two
counts, not the arithmetic, decide the speed. :class:`OpCounter` is a ``TorchDispatchMode`` that counts
both while a step runs, each under the phase it ran in (``forward``: inside the module call;
``reverse``: inside ``backward()``), so a CPU run already shows what a GPU run would launch and wait for.

**What counts as an op.** Every ATen op that reaches the dispatch mode, except

* views: ``func.is_view`` (``view``, ``slice``, ``select``, ``t``, ``split``, ``expand``, ``unbind``, ...,
  and the aliasing no-ops ``detach``, ``alias``, ``lift_fresh``, which torch also marks as views);
* :data:`NO_OPS`: ops that alias or only read metadata but are not marked as views (``_unsafe_view``,
  ``sym_size``, ...): no kernel, no allocation;
* :data:`ALLOCATIONS`: uninitialised allocations (``empty``, ``new_empty``, ...): an allocator call, no
  kernel. They are counted apart (:attr:`PhaseCounts.allocations`), not in :attr:`PhaseCounts.total_ops`.

Everything else counts once per call, whatever its size: a GEMM and a one-element ``add`` alike.
Composite ops (``F.linear``, ``torch.split`` of a list, ...) are counted as the ops they decompose into
at this level, the ones a device runs.

**What counts as a host sync.** A read of a device value by the host, or an op whose output shape
depends on device values (the host must wait to allocate it):

* ``aten._local_scalar_dense``: ``item()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``if t:``;
* :data:`DATA_DEPENDENT_SHAPE`: ``nonzero``, ``masked_select``, ``unique``..., ``repeat_interleave``
  without ``output_size``, and ``index`` / ``index_put`` with a boolean index (``x[mask]``);
* ``equal`` (returns a Python bool);
* a copy from a non-CPU device to the CPU (``aten._to_copy`` / ``aten.copy_``, not ``non_blocking``);
* ``Tensor.tolist()``, ``Tensor.numpy()``, ``Tensor.cpu()`` and ``Tensor.to(<cpu>)``, which the counter
  wraps while it is active. On a CPU run they are counted for every tensor (on CUDA the same code would
  read device data, which is what the count is for); on a CUDA run only for non-CPU tensors.

A CPU run cannot tell a read of a tensor that would live on the host anyway (``torch.randint(...)
.item()`` without a device) from a device read; :attr:`PhaseCounts.sync_sites` names the line of every
sync, so such a case can be recognised.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:  # the fused backend is imported only where a step is counted on it
    from lightning_revrnn.fused import StageCounter

aten = torch.ops.aten

#: Ops that alias their input or only read metadata although their schema does not mark them as views.
NO_OPS: frozenset[Any] = frozenset(
    {
        aten._unsafe_view,
        aten._reshape_alias,
        aten.sym_size,
        aten.sym_stride,
        aten.sym_numel,
        aten.sym_storage_offset,
        aten.is_same_size,
        aten.alias,
        aten.detach,
        aten.lift_fresh,
    }
)
#: Uninitialised allocations: an allocator call, no kernel (counted apart from the ops).
ALLOCATIONS: frozenset[Any] = frozenset(
    {
        aten.empty,
        aten.empty_like,
        aten.empty_strided,
        aten.new_empty,
        aten.new_empty_strided,
    }
)
#: Ops whose output shape depends on device values: the host waits for the device to size the result.
DATA_DEPENDENT_SHAPE: frozenset[Any] = frozenset(
    {
        aten.nonzero,
        aten.masked_select,
        aten._unique,
        aten._unique2,
        aten.unique_dim,
        aten.unique_consecutive,
        aten.unique_dim_consecutive,
        aten.argwhere,
    }
)
#: Ops that return a host value computed from device data.
HOST_VALUE: frozenset[Any] = frozenset({aten._local_scalar_dense, aten.equal})
#: Tensor methods wrapped while a counter is active (see the module docstring).
HOST_READ_METHODS = ("tolist", "numpy", "cpu", "to")
#: Frames from these paths are skipped when naming the site of a sync.
_SKIPPED_PATHS = (os.path.dirname(torch.__file__), os.path.abspath(__file__))


@dataclass
class PhaseCounts:
    """What one phase ran: ``ops`` (op name -> calls, views/no-ops/allocations left out, see the module
    docstring), ``allocations`` (uninitialised allocations), ``syncs`` (sync kind -> count),
    ``sync_sites`` (``file:line function`` of the first frame outside torch -> count) and, when the
    counter records them, ``op_sites`` (``file:line function op`` -> calls)."""

    ops: Counter[str] = field(default_factory=Counter)
    allocations: int = 0
    #: Kernels run by the fused backend's compiled stages (``lightning_revrnn.fused``), which bypass the
    #: dispatcher: inductor-generated kernels plus the GEMMs each graph calls as extern kernels, as counted by
    #: the counter's :class:`~lightning_revrnn.fused.StageCounter` (0 without one).
    kernels: int = 0
    syncs: Counter[str] = field(default_factory=Counter)
    sync_sites: Counter[str] = field(default_factory=Counter)
    op_sites: Counter[str] = field(default_factory=Counter)

    @property
    def total_ops(self) -> int:
        """Counted op calls."""
        return sum(self.ops.values())

    @property
    def ops_and_kernels(self) -> int:
        """Counted op calls plus compiled kernels: what a device launches (each op at least one kernel)."""
        return self.total_ops + self.kernels

    @property
    def total_syncs(self) -> int:
        """Host syncs."""
        return sum(self.syncs.values())

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` most frequent ops with their counts."""
        return self.ops.most_common(n)

    def to_json(self) -> dict[str, Any]:
        """Flat JSON-serialisable mapping (ops sorted by count)."""
        return {
            "total_ops": self.total_ops,
            "kernels": self.kernels,
            "allocations": self.allocations,
            "total_syncs": self.total_syncs,
            "ops": dict(self.ops.most_common()),
            "syncs": dict(self.syncs),
            "sync_sites": dict(self.sync_sites),
            **({"op_sites": dict(self.op_sites.most_common())} if self.op_sites else {}),
        }


class OpCounter(TorchDispatchMode):
    """Counts ops and host syncs (see the module docstring) per phase while active.

    Usage::

        with OpCounter() as counter:
            with counter.phase("forward"):
                out = model(x)
            loss = out.sum()                      # outside any phase: counted under "other"
            with counter.phase("reverse"):
                loss.backward()
        counter.phases["forward"].total_ops

    The mode follows the step into the autograd engine (its thread-local state travels with backward), so
    a custom ``autograd.Function``'s backward is counted under the phase ``backward()`` was called in.

    ``stage_counter``: the :class:`~lightning_revrnn.fused.StageCounter` of the fused backend the step runs
    on (``FusedBackend(stage_counter)``); each phase adds the compiled kernels it counted meanwhile to
    :attr:`PhaseCounts.kernels`.
    """

    def __init__(self, record_sites: bool = False, stage_counter: StageCounter | None = None) -> None:
        super().__init__()
        #: Also count every op by the line that called it (:attr:`PhaseCounts.op_sites`; slow: a stack walk per op).
        self.record_sites = record_sites
        self.stage_counter = stage_counter
        self.phases: dict[str, PhaseCounts] = {}
        self._phase = "other"
        self._host_read_depth = 0  # > 0 inside a wrapped Tensor method: its inner copies are that one sync
        self._saved_methods: dict[str, Any] = {}

    @property
    def current(self) -> PhaseCounts:
        """The counts of the phase now running (created on first use)."""
        counts = self.phases.get(self._phase)
        if counts is None:
            counts = self.phases[self._phase] = PhaseCounts()
        return counts

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseCounts]:
        """Count what runs inside under ``name`` (phases may repeat: counts add up)."""
        previous, self._phase = self._phase, name
        kernels = self._stage_kernels()
        try:
            yield self.current
        finally:
            self.current.kernels += self._stage_kernels() - kernels
            self._phase = previous

    def _stage_kernels(self) -> int:
        """The compiled kernels the stage counter has counted so far (0 without one)."""
        return 0 if self.stage_counter is None else sum(self.stage_counter.kernels.values())

    # ------------------------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        counts = self.current
        if packet in ALLOCATIONS:
            counts.allocations += 1
        elif not (func.is_view or packet in NO_OPS):
            counts.ops[str(func)] += 1
            if self.record_sites:
                counts.op_sites[f"{_caller_site()} {func}"] += 1
        kind = sync_kind(func, args, kwargs)
        if kind is not None and self._host_read_depth == 0:
            self._record_sync(kind)
        return func(*args, **kwargs)

    def _record_sync(self, kind: str) -> None:
        counts = self.current
        counts.syncs[kind] += 1
        counts.sync_sites[_caller_site()] += 1

    # ------------------------------------------------------------------------------ host reads
    def __enter__(self) -> OpCounter:
        self._wrap_host_reads()
        try:
            super().__enter__()
        except BaseException:
            self._restore_host_reads()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._restore_host_reads()

    def _wrap_host_reads(self) -> None:
        for name in HOST_READ_METHODS:
            self._saved_methods[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._host_read(name, getattr(torch.Tensor, name)))

    def _restore_host_reads(self) -> None:
        for name, original in self._saved_methods.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._saved_methods = {}

    def _host_read(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` counting one sync when it reads ``self``'s data on the host."""
        counter = self

        def wrapped(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter._host_read_depth == 0 and _reads_to_host(name, tensor, args, kwargs):
                counter._record_sync(f"Tensor.{name}")
                counter._host_read_depth += 1
                try:
                    return method(tensor, *args, **kwargs)
                finally:
                    counter._host_read_depth -= 1
            return method(tensor, *args, **kwargs)

        wrapped.__name__ = name
        return wrapped


def _is_cpu(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _device_data(tensor: Tensor) -> bool:
    """Whether ``tensor``'s data counts as device data: any tensor on a CPU run (the same code on CUDA
    would hold it on the device), a non-CPU tensor otherwise."""
    return tensor.device.type != "cpu" or not torch.cuda.is_available()


def _reads_to_host(name: str, tensor: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the wrapped method ``name`` called with these arguments copies device data to the host."""
    if not _device_data(tensor):
        return False
    if name != "to":
        return True
    target = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            target = a
        elif isinstance(a, Tensor):
            target = a.device
    return _is_cpu(target)


def sync_kind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The kind of host sync an ATen call is (its op name), or None (see the module docstring)."""
    packet = func.overloadpacket
    name = packet.__name__
    if packet in HOST_VALUE or packet in DATA_DEPENDENT_SHAPE:
        return name
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return name
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{name}(bool mask)"
    if packet is aten._to_copy and not kwargs.get("non_blocking", False):
        source = args[0]
        if isinstance(source, Tensor) and source.device.type != "cpu" and _is_cpu(kwargs.get("device")):
            return "device-to-host copy"
    if packet is aten.copy_ and not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
        dst, src = args[0], args[1]
        if isinstance(src, Tensor) and src.device.type != "cpu" and dst.device.type == "cpu":
            return "device-to-host copy"
    return None


def _caller_site() -> str:
    """``file:line function`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_SKIPPED_PATHS):
            return f"{os.path.relpath(path)}:{frame.lineno} {frame.name}"
    return "<torch>"


# ---------------------------------------------------------------------------------------- one step
@dataclass
class StepCounts:
    """One training step's counts: ``forward`` (inside the module call), ``reverse`` (inside backward),
    normalised by ``steps`` (T) and ``layers``."""

    forward: PhaseCounts
    reverse: PhaseCounts
    steps: int
    layers: int

    @property
    def forward_per_step_layer(self) -> float:
        """Forward ops + compiled kernels / (T · layers): per-window constants included, spread over the window."""
        return self.forward.ops_and_kernels / (self.steps * self.layers)

    @property
    def reverse_per_step_layer(self) -> float:
        """Reverse (backward) ops + compiled kernels / (T · layers)."""
        return self.reverse.ops_and_kernels / (self.steps * self.layers)

    def to_json(self) -> dict[str, Any]:
        """Flat JSON-serialisable mapping: the normalised figures, the syncs per window, each phase."""
        return {
            "steps": self.steps,
            "layers": self.layers,
            "forward_ops_per_step_layer": self.forward_per_step_layer,
            "reverse_ops_per_step_layer": self.reverse_per_step_layer,
            "forward_syncs_per_window": self.forward.total_syncs,
            "reverse_syncs_per_window": self.reverse.total_syncs,
            "forward": self.forward.to_json(),
            "reverse": self.reverse.to_json(),
        }


def count_step(
    forward: Callable[[], Tensor],
    steps: int,
    layers: int,
    to_loss: Callable[[Tensor], Tensor] | None = None,
    record_sites: bool = False,
    stage_counter: StageCounter | None = None,
) -> StepCounts:
    """Run one training step under an :class:`OpCounter`: ``forward()`` in phase ``forward``, then the
    backward of ``to_loss(output)`` (default: the output itself, which must then be a scalar; the loss
    reduction is not counted) in phase ``reverse``. ``steps`` (T) and ``layers`` normalise the counts;
    ``record_sites`` as :class:`OpCounter`'s. ``stage_counter``: the model runs on ``FusedBackend(stage_counter)``
    (inject it: ``rnn.fused = FusedBackend(stage_counter)``); the step runs inside
    :meth:`StageCounter.recording` (which recompiles every stage) and its compiled stages are counted as
    kernels."""
    context = stage_counter.recording() if stage_counter is not None else contextlib.nullcontext()
    with context, OpCounter(record_sites, stage_counter) as counter:
        with counter.phase("forward"):
            out = forward()
        loss = out if to_loss is None else to_loss(out)
        with counter.phase("reverse"):
            loss.backward()
    return StepCounts(
        counter.phases.get("forward", PhaseCounts()), counter.phases.get("reverse", PhaseCounts()), steps, layers
    )


def marginal_per_step_layer(short: StepCounts, long: StepCounts) -> tuple[float, float] | None:
    """(forward, reverse) ops added by one more step of one layer: the slope between two window lengths
    of the same model, free of per-window constants. None when the lengths are equal."""
    dt = long.steps - short.steps
    if dt == 0:
        return None
    layers = long.layers
    return (
        (long.forward.total_ops - short.forward.total_ops) / (dt * layers),
        (long.reverse.total_ops - short.reverse.total_ops) / (dt * layers),
    )


# --------------------------------------------------------------------------------------------- CLI
def _site_report(
    cell: str,
    steps: int,
    layers: int,
    hidden: int,
    batch: int,
    bits: int | None,
    top: int,
    fused: bool = False,
    summary: dict[str, Any] | None = None,
) -> str:
    """One counted ``mode="reverse"`` step of a small model, every op by the line that ran it. ``summary``,
    when given, receives the per step per layer figures (for ``--json``)."""
    from lightning_revrnn import NFRevGRU, NFRevLSTM, RevGRU, RevLSTM
    from lightning_revrnn.fused import FusedBackend, StageCounter

    torch.manual_seed(0)
    cls = {"gru": RevGRU, "lstm": RevLSTM, "nfgru": NFRevGRU, "nflstm": NFRevLSTM}[cell]
    bits = None if cell.startswith("nf") else bits  # no forgetting: no forget limit
    rnn = cls(hidden, hidden, layers, max_forget_bits=bits)
    stages = StageCounter() if fused else None
    if stages is not None:
        rnn.fused = FusedBackend(stages)  # the fused backend, its stages counted
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    counts = count_step(
        lambda: rnn(x)[0], steps, layers, to_loss=lambda out: out.sum(), record_sites=True, stage_counter=stages
    )
    scale = steps * layers
    if summary is not None:
        for name, phase in (("forward", counts.forward), ("reverse", counts.reverse)):
            summary[f"{name}_ops_and_kernels"] = phase.ops_and_kernels / scale
            summary[f"{name}_ops"] = phase.total_ops / scale
            summary[f"{name}_kernels"] = phase.kernels / scale
            summary[f"{name}_syncs_per_window"] = phase.total_syncs
        summary["stages"] = (
            {
                name: {
                    "calls_per_step_layer": stages.calls[name] / scale,
                    "kernels_per_call": n / max(stages.calls[name], 1),
                }
                for name, n in stages.kernels.items()
            }
            if stages is not None
            else {}
        )
    lines = [
        f"{cls.__name__}{' fused' if fused else ''} T={steps} L={layers} H={hidden} B={batch} k={bits}: ops "
        f"(+ compiled kernels) per step per layer (views, no-ops and allocations left out; benchmarks/opcount.py)"
    ]
    if stages is not None:
        lines.append(
            "compiled stages, calls and kernels per step per layer (forward + reverse): "
            + ", ".join(
                f"{name} {stages.calls[name] / scale:.2f} x {n / max(stages.calls[name], 1):.0f}"
                for name, n in stages.kernels.items()
            )
        )
    for name, phase in (("forward", counts.forward), ("reverse", counts.reverse)):
        lines.append(
            f"{name}: {phase.ops_and_kernels / scale:.2f} ops + kernels ({phase.total_ops / scale:.2f} ops, "
            f"{phase.kernels / scale:.2f} compiled kernels), {phase.allocations / scale:.2f} allocations, "
            f"{phase.total_syncs} syncs per window {dict(phase.sync_sites)}"
        )
        lines += [f"  {n / scale:6.2f}  {site}" for site, n in phase.op_sites.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print where a reversible step's ops come from (``python benchmarks/opcount.py --cell lstm``)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--cell", choices=["gru", "lstm", "nfgru", "nflstm"], nargs="+", default=["gru"])
    p.add_argument("--steps", type=int, default=64, help="T (default 64: 4 chunks, per-window ops spread thin)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=32, help="even; op counts do not depend on it")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bits", type=lambda s: None if s == "none" else int(s), default=3)
    p.add_argument("--top", type=int, default=40, help="op sites printed per phase")
    p.add_argument("--fused", action="store_true", help="the fused path (fused=True), its compiled kernels counted")
    p.add_argument("--json", type=str, help="also write the per step per layer figures of each cell to this path")
    a = p.parse_args(argv)
    rows = []
    for cell in a.cell:
        summary: dict[str, Any] = {
            "cell": cell,
            "fused": a.fused,
            "steps": a.steps,
            "layers": a.layers,
            "hidden": a.hidden,
            "batch": a.batch,
            "bits": a.bits,
        }
        print(_site_report(cell, a.steps, a.layers, a.hidden, a.batch, a.bits, a.top, a.fused, summary))
        rows.append(summary)
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "unit": "per step per layer: non-view ATen ops + compiled kernels",
                    "rows": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
