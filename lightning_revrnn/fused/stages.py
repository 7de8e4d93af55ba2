"""The fused backend's compiled stages: the exact half-steps as a few ``torch.compile`` graphs.

``torch.compile`` (inductor) turns each stage into one or a few kernels, C++ on the CPU and Triton on
CUDA, from this one source; the eager cells (:mod:`lightning_revrnn.core.cells`) stay the bit-exact
reference. A half-step is split so that exactness does not depend on how the compiler vectorises
float math:

* a **gate stage** per cell type (float, around the GEMMs): the gates, the rounded forget values
  ``z*`` and the rounded additive terms ``to_fixed(add)``. Compiled float math (a vectorised sigmoid,
  exp or tanh) may differ in the last bits from eager and from another kernel, so everything that feeds
  rounding is computed by the *same* compiled function, with the same shapes, in the forward and in the
  reverse sweep (:meth:`Stages.gru_gates`, :meth:`Stages.lstm_gates`, and :meth:`Stages.lstm_h_term` for the
  LSTM's ``o∘tanh(c)``, which reads the freshly updated ``c``);
* a **backward stage** per cell type (:meth:`Stages.step_backward`): a whole step's written-out
  backward in one graph (:mod:`lightning_revrnn.fused.step_backward`), its GEMMs extern kernels, the
  elementwise work around them fused; gradients feed no rounding, so only the tolerance matters there;
* **integer stages** (:meth:`Stages.multiply_add`, :meth:`Stages.subtract_divide`, :meth:`Stages.add_term`,
  :meth:`Stages.subtract_term`): the fixed-point multiply with the buffer word plus the additive term, and its
  inverse. Integer ops are exact in any form (the tests check them bit for bit against
  :func:`~lightning_revrnn.core.fixed_point.reversible_multiply`/``divide``, inductor's floor division
  included). They also return the new value as float32: an int64 → float32 conversion is correctly
  rounded in any implementation (exact via float64 for ``|h*| < 2^53``, and the scaling by ``2^-R_H`` is
  exact), so it equals the eager :func:`~lightning_revrnn.core.fixed_point.to_float` bit for bit.

The units' drains stay in :class:`~lightning_revrnn.core.buffer.InformationBuffer` (eager, before the
multiplication they precede, and the pops after the division they follow); an integer stage takes and
returns the buffer word (and, when the buffer retains, the per-unit ``Σ log2 z*`` accumulator), one
multiplication per call.

Compile cost: one compile per (stage, forget limit, shapes, keep mask or not); ``dynamic=False``, and no
Python value that changes per step enters a stage. Stages run only without autograd (the forward of
``mode="reverse"``, evaluation, and the reverse sweep); ``mode="store"`` keeps the eager cells.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from lightning_revrnn.core.errors import FusedPathError
from lightning_revrnn.core.fixed_point import reversible_divide, reversible_multiply, to_fixed, to_float
from lightning_revrnn.core.gates import forget_scaled, gru_gates_split, hold, lstm_gates, round_forget
from lightning_revrnn.core.records import Record
from lightning_revrnn.fused.step_backward import gru_half_backward, lstm_half_backward, step_backward

#: dynamo's per-function recompile limit is raised to at least this: every layer shape, forget limit and
#: keep-mask variant of a stage is one compiled entry of the same Python function.
RECOMPILE_LIMIT = 64


# ------------------------------------------------------------------------------------------- stages
def _gru_gates(
    w: Tensor, xp: Tensor, other: Tensor, keep: Tensor | None, max_forget_bits: int | None, forgets: bool
) -> tuple[Tensor | None, ...]:
    """A RevGRU group: ``(z, r, g, r∘other, z* or None, z*/2^R_Z, add, to_fixed(add))``, the identity update
    where ``keep`` is False (as :meth:`RevGRUCell._update`). One gate a tensor (:func:`gru_gates_split`):
    the elementwise work before and after the second GEMM is one loop each."""
    z, r, g, r_other = gru_gates_split(w, xp, other)
    zq: Tensor | None
    if forgets:
        zq, zs = round_forget(forget_scaled(z, max_forget_bits), max_forget_bits)
        add = torch.addcmul(g, zs, g, value=-1.0)  # (1 − z*)·g
    else:
        zq, zs, add = None, torch.ones_like(z), (1.0 - z) * g
    (zq,), (zs,), (add,) = hold(keep, [zq], [zs], [add])
    return z, r, g, r_other, zq, zs, add, to_fixed(add)


def _lstm_gates(
    w: Tensor, xp: Tensor, other: Tensor, keep: Tensor | None, max_forget_bits: int | None, forgets: bool
) -> tuple[Tensor | None, ...]:
    """A RevLSTM group: ``(σ([f; i; o; p]), g, f*, p* (None without forgetting), f*/2^R_Z, p*/2^R_Z, i∘g,
    to_fixed(i∘g), o held)``, the identity update where ``keep`` is False (as :meth:`RevLSTMCell._update`).

    Every unit of the sigmoid block is rounded as a forget value and ``f*``, ``p*`` are slices of that:
    the rounding then shares the sigmoid's loop (rounding ``i`` and ``o`` too costs nothing), where rounding
    ``f`` and ``p`` alone needs a concatenation or loops of their own (a kernel each)."""
    n = other.shape[1]
    sig, g = lstm_gates(w, xp, other)
    f, i, o, _ = sig.split(n, 1)
    fq: Tensor | None
    pq: Tensor | None
    if forgets:
        q, scaled = round_forget(forget_scaled(sig, max_forget_bits), max_forget_bits)
        fq, pq, fs, ps = q[:, :n], q[:, 3 * n :], scaled[:, :n], scaled[:, 3 * n :]
    else:
        fq = pq = None
        fs = ps = torch.ones_like(f)
    (fq, pq), (fs, ps), (add_c, o_held) = hold(keep, [fq, pq], [fs, ps], [i * g, o])
    return sig, g, fq, pq, fs, ps, add_c, to_fixed(add_c), o_held


def _lstm_h_term(o: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The RevLSTM's additive term of ``h``, ``o∘tanh(c)`` from the updated ``c`` (float), and its rounding."""
    add = o * torch.tanh(c)
    return add, to_fixed(add)


def _multiply_add(h: Tensor, z: Tensor, word: Tensor, add: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``h*·z*/2^R_Z + add`` through the buffer word: (new h*, its float32 value, new word)."""
    h, word = reversible_multiply(h, z, word)
    h = h + add
    return h, to_float(h), word


def _multiply_add_logged(
    h: Tensor, z: Tensor, word: Tensor, add: Tensor, log2_units: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_multiply_add` that also adds ``log2 z*`` (the optimal bits' accounting) to ``log2_units``."""
    h, h_f, word = _multiply_add(h, z, word, add)
    return h, h_f, word, log2_units + torch.log2(z)


def _subtract_divide(h: Tensor, add: Tensor, z: Tensor, word: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`_multiply_add`: (old h*, its float32 value, old word)."""
    h, word = reversible_divide(h - add, z, word)
    return h, to_float(h), word


def _add_term(h: Tensor, add: Tensor) -> tuple[Tensor, Tensor]:
    """No forgetting: ``h* + add`` and its float32 value."""
    h = h + add
    return h, to_float(h)


def _subtract_term(h: Tensor, add: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`_add_term`."""
    h = h - add
    return h, to_float(h)


def _gru_step_backward(
    w: list[Tensor],
    records: list[Record],
    d_state: list[Tensor],
    d_output: Tensor,
    keep: Tensor | None,
    forget_slope: float,
    forgets: bool,
) -> tuple[list[Tensor], Tensor]:
    """A RevGRU step's written-out backward (:func:`~lightning_revrnn.fused.step_backward.step_backward`)."""

    def half(
        w: Tensor, record: Record, d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        return gru_half_backward(w, record, d_new, keep, forget_slope, forgets)

    return step_backward(half, 1, w, records, d_state, d_output, keep)


def _lstm_step_backward(
    w: list[Tensor],
    records: list[Record],
    d_state: list[Tensor],
    d_output: Tensor,
    keep: Tensor | None,
    forget_slope: float,
    forgets: bool,
) -> tuple[list[Tensor], Tensor]:
    """A RevLSTM step's written-out backward (:func:`~lightning_revrnn.fused.step_backward.step_backward`)."""

    def half(
        w: Tensor, record: Record, d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        return lstm_half_backward(w, record, d_new, keep, forget_slope, forgets)

    return step_backward(half, 2, w, records, d_state, d_output, keep)


# ---------------------------------------------------------------------------------------- compiling
class CompiledStage:
    """One stage, compiled on first call (``torch.compile(dynamic=False, fullgraph=True)``).

    Failures to compile or run (no C++ compiler, no Triton, an unsupported torch) become a
    :class:`~lightning_revrnn.core.errors.FusedPathError` naming the fix. With a ``counter``, every call is
    counted there (:class:`StageCounter`)."""

    def __init__(self, name: str, fn: Callable[..., Any], counter: StageCounter | None = None) -> None:
        self.name = name
        self.fn = fn
        self.counter = counter
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        try:
            if self._compiled is None:
                _raise_recompile_limit()
                self._compiled = torch.compile(self.fn, dynamic=False, fullgraph=True)
            if self.counter is not None:
                return self.counter.run(self.name, self._compiled, args)
            return self._compiled(*args)
        except Exception as exc:
            if type(exc).__name__ == "FailOnRecompileLimitHit":
                raise FusedPathError(
                    f"The fused path's compiled stage {self.name!r} met more than {RECOMPILE_LIMIT} distinct shapes "
                    "(every batch size, layer size and forget limit compiles once). Fix: keep batch sizes fixed "
                    "(e.g. drop_last=True), raise torch._dynamo.config.recompile_limit, or build the module with "
                    "fused=False."
                ) from exc
            raise FusedPathError(
                f"The fused path's compiled stage {self.name!r} failed ({type(exc).__name__}: {exc}). torch.compile "
                "needs a working C++ compiler on the CPU and Triton on CUDA. Fix: build the module with fused=False "
                "(the eager path computes the same exact algorithm), or install the compiler toolchain."
            ) from exc


def _raise_recompile_limit() -> None:
    """Raise dynamo's per-function recompile limit to :data:`RECOMPILE_LIMIT` (on the first compile, not on
    import): every layer shape, forget limit and keep-mask variant of a stage is one entry of one function."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < RECOMPILE_LIMIT:
            setattr(config, name, RECOMPILE_LIMIT)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "gru_gates": _gru_gates,
    "lstm_gates": _lstm_gates,
    "lstm_h_term": _lstm_h_term,
    "multiply_add": _multiply_add,
    "multiply_add_logged": _multiply_add_logged,
    "subtract_divide": _subtract_divide,
    "add_term": _add_term,
    "subtract_term": _subtract_term,
    "gru_backward": _gru_step_backward,
    "lstm_backward": _lstm_step_backward,
}
_CONSTANTS = {
    "gru_gates": ("max_forget_bits", "forgets"),
    "lstm_gates": ("max_forget_bits", "forgets"),
    "gru_backward": ("forget_slope", "forgets"),
    "lstm_backward": ("forget_slope", "forgets"),
}


class Stages:
    """The compiled stages one backend calls, compiled on first use, each (stage, constants) once.

    ``counter``: count every call and the kernels it ran (a benchmark's :class:`StageCounter`)."""

    def __init__(self, counter: StageCounter | None = None) -> None:
        self.counter = counter
        self._stages: dict[tuple[Any, ...], CompiledStage] = {}

    def get(self, name: str, *constants: Any) -> CompiledStage:
        """Stage ``name`` with its constants (``_CONSTANTS``) bound."""
        key = (name, *constants)
        stage = self._stages.get(key)
        if stage is None:
            fn = _FUNCTIONS[name]
            bound = functools.partial(fn, **dict(zip(_CONSTANTS.get(name, ()), constants))) if constants else fn
            label = name if not constants else f"{name}{constants}"
            stage = self._stages[key] = CompiledStage(label, bound, self.counter)
        return stage

    def gru_gates(self, max_forget_bits: int | None, forgets: bool) -> CompiledStage:
        """``(w, xp, other, keep) -> (z, r, g, r∘other, z*, z*/2^R_Z, add, to_fixed(add))`` (``z*`` None without
        forgetting)."""
        return self.get("gru_gates", max_forget_bits, forgets)

    def lstm_gates(self, max_forget_bits: int | None, forgets: bool) -> CompiledStage:
        """``(w, xp, other, keep) -> (σ block, g, f*, p*, f*/2^R_Z, p*/2^R_Z, i∘g, to_fixed(i∘g), o held)``
        (``f*``, ``p*`` None without forgetting)."""
        return self.get("lstm_gates", max_forget_bits, forgets)

    def step_backward(self, cell_type: str, forget_slope: float, forgets: bool) -> CompiledStage:
        """A whole step's written-out backward, ``cell_type`` ``"gru"`` or ``"lstm"``: ``(w, records, d_state,
        d_output, keep) -> (d_state before the step, d_pre (B, 2·rows))``."""
        return self.get(f"{cell_type}_backward", forget_slope, forgets)

    def lstm_h_term(self) -> CompiledStage:
        """``(o, c) -> (o∘tanh(c), to_fixed(o∘tanh(c)))``."""
        return self.get("lstm_h_term")

    def multiply_add(self, retain: bool) -> CompiledStage:
        """``(h, z, word, add) -> (h, h_float, word)``; retaining, ``(h, z, word, add, log2_units) -> (h,
        h_float, word, log2_units)``."""
        return self.get("multiply_add_logged" if retain else "multiply_add")

    def subtract_divide(self) -> CompiledStage:
        """``(h, add, z, word) -> (h, h_float, word)``."""
        return self.get("subtract_divide")

    def add_term(self) -> CompiledStage:
        """No forgetting: ``(h, add) -> (h, h_float)``."""
        return self.get("add_term")

    def subtract_term(self) -> CompiledStage:
        """No forgetting: ``(h, add) -> (h, h_float)``."""
        return self.get("subtract_term")


# ----------------------------------------------------------------------------------------- counting
class _GemmNodes:
    """A post-grad pass that counts the GEMM nodes of the graph being compiled: inductor calls them as extern
    kernels (ATen), which ``generated_kernel_count`` leaves out."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        gemms = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
        self.count += sum(1 for node in graph.nodes if node.op == "call_function" and node.target in gemms)


class StageCounter:
    """Counts compiled-stage calls and the kernels they ran: ``calls`` and ``kernels`` per stage.

    Compiled kernels do not pass through the ATen dispatcher, so an op counter cannot see them. A stage's
    kernel count is what inductor generated for its graph (``torch._inductor.metrics.generated_kernel_count``
    during the compile) plus its GEMMs (extern ATen kernels, counted from the post-grad graph). So that every
    graph compiles (and is counted) while counting, :meth:`recording` resets dynamo on entry and exit and turns
    inductor's graph caches off; run the counted step inside it, with a backend built on this counter
    (``FusedBackend(counter)``). The stages run with any dispatch mode (an op counter) disabled, since dynamo
    runs nothing compiled under one.

    Example::

        >>> counter = StageCounter()
        >>> counter.calls, counter.kernels
        (Counter(), Counter())
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()
        self._graph_kernels: dict[tuple[Any, ...], int] = {}
        self._gemm_nodes = _GemmNodes()

    @contextlib.contextmanager
    def recording(self) -> Iterator[StageCounter]:
        """Count inside: fresh compiles (dynamo reset), inductor's caches off, the GEMM pass installed."""
        torch._dynamo.reset()
        patch = torch._inductor.config.patch(
            fx_graph_cache=False, autotune_local_cache=False, post_grad_custom_post_pass=self._gemm_nodes
        )
        try:
            with patch:
                yield self
        finally:
            torch._dynamo.reset()  # the counted graphs were compiled under the patched config

    def run(self, name: str, compiled: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Call ``compiled(*args)`` and count it under ``name``."""
        from torch._inductor import metrics
        from torch.utils._python_dispatch import _disable_current_modes

        leaves, spec = torch.utils._pytree.tree_flatten(args)  # a stage may take lists of tensors (the backward)
        signature = (
            name,
            str(spec),
            *[(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, Tensor) else a for a in leaves],
        )
        before, self._gemm_nodes.count = metrics.generated_kernel_count, 0
        with _disable_current_modes():  # dynamo runs nothing compiled under a dispatch mode (an op counter)
            out = compiled(*args)
        if metrics.generated_kernel_count != before or self._gemm_nodes.count:
            self._graph_kernels[signature] = metrics.generated_kernel_count - before + self._gemm_nodes.count
        self.calls[name] += 1
        self.kernels[name] += self._graph_kernels.get(signature, 0)
        return out
