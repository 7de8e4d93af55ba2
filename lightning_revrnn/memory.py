"""Measuring a training step's memory from its allocation trace: its peak, and what it keeps for backward.

``torch.profiler.profile(profile_memory=True)`` records every allocation and free of the CPU allocator and
of the CUDA caching allocator with its address, size and time. From that one trace (:class:`MemoryTrace`):

- **peak**: the highest level of (bytes allocated since the start − bytes freed since the start), forward
  and backward together; temporaries that live inside one op count too. Parameter gradients allocated
  during the trace are also reported on their own, and the peak is recomputed without them. On CPU only
  the frees of blocks allocated in the same trace count, so memory from before the step that the step
  releases does not offset its own allocations: the peak is that of the step's own allocations alive at
  once, never below the truth, and the same for the same step in every run. (PyTorch's CPU allocator also
  reports frees of blocks from earlier traces, and of blocks at an address an earlier trace once saw, with
  that old size; which addresses get reused changes from run to run, so counting those frees made the
  peak vary by some KiB.) On CUDA the allocator's peak is used.
- **saved**: the storages autograd saves for backward (``saved_tensors_hooks``) *that were allocated during
  the forward*, each counted once, whole. Only those cost the step memory: a saved view of something that
  existed before (a ``(20, 8)`` batch sliced from a corpus tensor, a parameter, a carried hidden state)
  keeps nothing alive that was not alive anyway, so it counts 0, not the corpus's storage. A saved view of
  a tensor allocated in the step keeps its *whole* storage alive, so the whole storage counts, not the
  view's extent (counting the extent would undercount such slices).

A storage is "allocated during the forward" when the trace holds an allocation at its address between the
forward's start and end: a storage that existed before stays alive (it is saved) until backward, so no
other allocation can take its address in between.

Recent PyTorch releases make the profiler's backend (kineto) write a line to the process's stderr at every start
and stop, whatever its log level (``USDT:<time> <pid>:<tid> SyncActivityProfilerHandler.cpp:52] profiler_start``);
:class:`MemoryTrace` drops exactly those two lines and passes anything else written meanwhile on.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function

_FORWARD_START = "MemoryTrace.forward_start"
_FORWARD_END = "MemoryTrace.forward_end"
#: (device, address) of a storage.
StorageKey = tuple[torch.device, int]
#: What kineto writes to file descriptor 2 when a profiler starts or stops (module docstring).
_KINETO_MARKER = re.compile(rb"^USDT:.*\] profiler_(start|stop)\s*$")


@dataclass(frozen=True)
class StepMemory:
    """What :meth:`MemoryTrace.stop` measured (bytes, on the traced device).

    ``peak_bytes``: highest allocation level above the level at the start (CUDA: the allocator's own peak,
    ``max_memory_allocated`` after ``reset_peak_memory_stats``). ``grad_bytes``: parameter gradients
    allocated during the trace and still alive at its end. ``peak_excl_grad_bytes``: the same peak with
    those gradient allocations left out of the trace. ``saved_bytes``: storages allocated in a forward and
    saved by autograd for backward, the largest over the traced forwards (micro-batches run one at a time).
    """

    peak_bytes: int
    grad_bytes: int
    peak_excl_grad_bytes: int
    saved_bytes: int
    saved_storages: int


@dataclass
class _Allocation:
    time_ns: int
    key: StorageKey
    size: int  # negative for a free


@contextmanager
def _without_kineto_markers() -> Iterator[None]:
    """Run the block with file descriptor 2 (where C++ code writes) captured, then write what it captured back
    to it, less kineto's profiler start/stop lines (:data:`_KINETO_MARKER`)."""
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 to capture
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            _flush_stderr()  # Python's own writes of the block, in their place
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not _KINETO_MARKER.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


def profiler_busy() -> bool:
    """True while another torch profiler runs (profilers cannot nest)."""
    return bool(torch.autograd.profiler._is_profiler_enabled)


def _allocations(prof: profile) -> tuple[list[_Allocation], list[tuple[str, int]]]:
    """Every allocation/free of the trace in time order, and the forward markers (name, time)."""
    allocations: list[_Allocation] = []
    markers: list[tuple[str, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == torch._C._profiler._EventType.Allocation:
            f = event.extra_fields
            allocations.append(_Allocation(event.start_time_ns, (torch.device(f.device), f.ptr), f.alloc_size))
        elif event.name in (_FORWARD_START, _FORWARD_END):
            markers.append((event.name, event.start_time_ns))
    allocations.sort(key=lambda a: a.time_ns)
    markers.sort(key=lambda m: m[1])
    return allocations, markers


def _peak(allocations: list[_Allocation], device: torch.device, skip: set[int]) -> int:
    """Highest running level of the device's allocations made in the trace (indices in ``skip`` left out), at
    least 0. A free counts only for a block allocated in the trace: the CPU allocator also reports frees of
    older blocks (with the size an earlier trace recorded at that address), which depend on address reuse."""
    live: dict[StorageKey, int] = {}
    level = peak = 0
    for i, a in enumerate(allocations):
        if a.key[0] != device or i in skip:
            continue
        if a.size > 0:
            level += a.size - live.pop(a.key, 0)  # an address allocated again was freed in between
            live[a.key] = a.size
        else:
            level -= live.pop(a.key, 0)
        peak = max(peak, level)
    return peak


def _live_allocations(allocations: list[_Allocation], keys: set[StorageKey]) -> dict[int, int]:
    """Index → size of the allocations at ``keys`` that are still alive at the end of the trace."""
    last: dict[StorageKey, int] = {}
    for i, a in enumerate(allocations):
        if a.key in keys:
            last[a.key] = i
    return {i: allocations[i].size for i in last.values() if allocations[i].size > 0}


@dataclass
class _Forward:
    saved: dict[StorageKey, int] = field(default_factory=dict)  # storage → its nbytes
    #: storage → the detached aliases autograd holds of it (weak: a graph dropped without backward frees them)
    aliases: dict[StorageKey, list[weakref.ref[Tensor]]] = field(default_factory=dict)

    def keep_held(self) -> None:
        """Forget the saved storages no graph holds any more (a graph discarded without backward)."""
        self.saved = {k: n for k, n in self.saved.items() if any(r() is not None for r in self.aliases.get(k, []))}
        self.aliases = {}


class MemoryTrace:
    """Trace a device's allocations between :meth:`start` and :meth:`stop` (spanning Lightning hooks).

    Mark each forward with :meth:`begin_forward` / :meth:`end_forward` to learn what it saves for backward.
    Profilers cannot nest: check :func:`profiler_busy` first (``start`` raises if one runs).

    Args:
        device: the device whose allocations are measured (``"cuda"`` means the current CUDA device).

    Example::

        >>> from torch import nn
        >>> model, x = nn.Linear(100, 100), torch.randn(8, 100)
        >>> trace = MemoryTrace(torch.device("cpu"))
        >>> trace.start()
        >>> trace.begin_forward()
        >>> loss = torch.tanh(model(x)).sum()
        >>> trace.end_forward()
        >>> loss.backward()
        >>> step = trace.stop(model.parameters())
        >>> step.saved_bytes, step.saved_storages  # tanh's (8, 100) float32 output; x and the weight existed
        (3200, 1)
        >>> step.grad_bytes  # the weight's and the bias's new .grad: (100 * 100 + 100) * 4
        40400
    """

    def __init__(self, device: torch.device) -> None:
        self.device = (
            device
            if device.index is not None or device.type != "cuda"
            else torch.device("cuda", torch.cuda.current_device())
        )
        self._profile: profile | None = None
        self._hooks: AbstractContextManager[None] | None = None
        self._forwards: list[_Forward] = []
        self._cuda_start = 0

    @property
    def running(self) -> bool:
        """Between :meth:`start` and :meth:`stop`."""
        return self._profile is not None

    def start(self) -> None:
        """Start tracing (CUDA: also reset the allocator's peak statistics)."""
        if profiler_busy():
            raise RuntimeError(
                "Another torch profiler is running; MemoryTrace needs its own. Stop the other "
                "profiler (e.g. the Trainer's profiler=...) or measure another step."
            )
        self._forwards = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle": one cycle here
            warnings.simplefilter("ignore")
            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _without_kineto_markers():
                self._profile.__enter__()

    def begin_forward(self) -> None:
        """A forward starts: record the storages autograd saves until :meth:`end_forward`."""
        if self._profile is None or self._hooks is not None:
            return
        forward = _Forward()
        self._forwards.append(forward)

        def pack(t: Tensor) -> Tensor:
            # A detached alias (same storage), not ``t`` itself: for a saved *output*, ``t`` → its grad_fn →
            # ``t`` is a cycle the garbage collector cannot see, which would keep a graph that is discarded
            # without backward (such as the reverse sweep's one-step input check) alive for good.
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
                return t
            alias = t.detach()
            if storage.data_ptr() != 0:
                key = (t.device, storage.data_ptr())
                forward.saved[key] = storage.nbytes()
                forward.aliases.setdefault(key, []).append(weakref.ref(alias))
            return alias

        with record_function(_FORWARD_START):
            pass
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()

    def end_forward(self) -> None:
        """The forward ends (call before backward): only saved storages some graph still holds count."""
        if self._hooks is None:
            return
        self._hooks.__exit__(None, None, None)
        self._hooks = None
        self._forwards[-1].keep_held()
        with record_function(_FORWARD_END):
            pass

    def abort(self) -> None:
        """Stop without a result (an exception interrupted the step)."""
        self.end_forward()
        if self._profile is not None:
            with _without_kineto_markers():
                self._profile.__exit__(None, None, None)
            self._profile = None

    def stop(self, parameters: Iterable[Tensor] = ()) -> StepMemory:
        """Stop tracing and measure; ``parameters``: whose ``.grad`` to report separately."""
        if self._profile is None:
            raise RuntimeError("MemoryTrace.stop() without start().")
        self.end_forward()
        grad_keys = {(p.grad.device, p.grad.untyped_storage().data_ptr()) for p in parameters if p.grad is not None}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self._profile = self._profile, None
        with warnings.catch_warnings(), _without_kineto_markers():
            warnings.simplefilter("ignore")
            prof.__exit__(None, None, None)
        allocations, markers = _allocations(prof)
        grads = _live_allocations(allocations, {k for k in grad_keys if k[0] == self.device})
        peak = _peak(allocations, self.device, set())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_start
        saved = [self._saved_bytes(f, allocations, w) for f, w in zip(self._forwards, _windows(markers))]
        largest = max(saved, default=(0, 0))
        return StepMemory(
            peak_bytes=peak,
            grad_bytes=sum(grads.values()),
            peak_excl_grad_bytes=min(peak, _peak(allocations, self.device, set(grads))),
            saved_bytes=largest[0],
            saved_storages=largest[1],
        )

    @staticmethod
    def _saved_bytes(forward: _Forward, allocations: list[_Allocation], window: tuple[int, int]) -> tuple[int, int]:
        """Bytes and count of the forward's saved storages that were allocated inside the forward."""
        begin, end = window
        new = {a.key for a in allocations if a.size > 0 and begin <= a.time_ns <= end}
        kept = [nbytes for key, nbytes in forward.saved.items() if key in new]
        return sum(kept), len(kept)


def _windows(markers: list[tuple[str, int]]) -> list[tuple[int, int]]:
    """(start, end) times of the marked forwards, in order."""
    starts = [t for name, t in markers if name == _FORWARD_START]
    ends = [t for name, t in markers if name == _FORWARD_END]
    return list(zip(starts, ends))


@dataclass
class SavedBytes:
    """Result of :func:`saved_tensor_bytes`: ``total`` bytes over ``storages`` distinct storages."""

    total: int = 0
    storages: int = 0


@contextmanager
def saved_tensor_bytes(exclude: Iterable[Tensor] = (), device: torch.device | str = "cpu") -> Iterator[SavedBytes]:
    """Bytes autograd saves for backward inside the block, counting only storages allocated in the block.

    The result is filled in when the block exits. Saved views of tensors that existed before the block
    (inputs, parameters) count 0; a saved view of a tensor allocated in the block counts its whole storage.

    Args:
        exclude: tensors whose storages are never counted (e.g. parameters; they exist before anyway).
        device: the device whose allocations are traced (saved storages on other devices are also
            recognised when the trace saw them allocated).

    Example::

        >>> from torch import nn
        >>> model, x = nn.Linear(100, 100), torch.randn(8, 100)
        >>> with saved_tensor_bytes(model.parameters()) as saved:
        ...     loss = torch.tanh(model(x)).sum()
        >>> saved.total, saved.storages  # only tanh's output (8 x 100 float32) is new and saved
        (3200, 1)
    """
    result = SavedBytes()
    excluded = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
    trace = MemoryTrace(torch.device(device))
    trace.start()
    trace.begin_forward()
    try:
        yield result
    except BaseException:
        trace.abort()
        raise
    trace.end_forward()
    forward = trace._forwards[0]
    for key in excluded:
        forward.saved.pop(key, None)
    measured = trace.stop()
    result.total, result.storages = measured.saved_bytes, measured.saved_storages
