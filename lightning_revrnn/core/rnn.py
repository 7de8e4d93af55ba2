"""Multi-layer reversible sequence modules shaped like ``nn.GRU`` / ``nn.LSTM``."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.backend import EAGER, Fused, backend_for, check_fused, warn_fallback
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.carry import ExactCarry
from lightning_revrnn.core.cell_base import ReversibleCell
from lightning_revrnn.core.cells import NFRevGRUCell, NFRevLSTMCell, RevGRUCell, RevLSTMCell
from lightning_revrnn.core.dropout import SeededMask, locked_mask
from lightning_revrnn.core.errors import FusedPathError
from lightning_revrnn.core.fixed_point import straight_through, to_fixed, to_float
from lightning_revrnn.core.forward import WindowResult, run_forward
from lightning_revrnn.core.graph_checks import check_declared_inputs, declared_context, trainable
from lightning_revrnn.core.inputs import check_float32_parameters, check_keep
from lightning_revrnn.core.numerics import AutocastState
from lightning_revrnn.core.protocol import StepHead, StepStem
from lightning_revrnn.core.sweep import ReverseSweep, WindowRecord
from lightning_revrnn.core.window import WindowPlan

Mode = Literal["reverse", "store"]
MODES = ("reverse", "store")
#: A state: one tensor ``(L, B, H)`` when all layers have the same size, else a list of ``(B, H_l)``.
State = Tensor | list[Tensor]


class ReversibleRNN(nn.Module):
    """Stack of reversible cells trained by reversal (``mode="reverse"``) or by storing (``"store"``).

    Args:
        input_size: features of ``x``.
        hidden_size: even size of every layer, or a list with one even size per layer.
        num_layers: layers (must match the list's length if ``hidden_size`` is a list).
        max_forget_bits: at most this many bits forgotten per unit and step: 1, 2, 3, 5 or None (≤ R_Z).
        dropout: locked dropout between layers (one mask per window, reused by the reverse sweep).
        input_dropout: locked dropout on the input of the first layer.
        dropconnect: DropConnect on the hidden-to-hidden weights (one mask per window).
        batch_first: ``x`` is ``(B, T, F)`` instead of ``(T, B, F)``.
        stored_units: the first ``S`` units of the top layer's ``h1`` (of ``h[..., :S]``, ``S ≤ H/2``) are
            stored every step instead of buffered, as the paper's attention slices (spec section 5): without
            a head the first return value is then those units, ``(T, B, S)`` float32 (their exact values),
            instead of all outputs, and its gradient flows back into the reverse sweep. They are updated in
            float32 rather than exactly (stored, they need no inverse); ``memory_stats()`` counts them as
            ``stored_bits`` (32 per unit and step), in ``used_bits`` and ``optimal_bits``.
        mode: ``"reverse"`` (reconstruct states in backward) or ``"store"`` (ordinary autograd through the
            same fixed-point forward). Settable later as ``rnn.mode``.
        fused: run the exact half-steps on the fused backend (:mod:`lightning_revrnn.fused`: ``torch.compile``
            stages, Triton kernels on CUDA) wherever no autograd records: the forward of ``mode="reverse"``,
            its reverse sweep and evaluation (``mode="store"`` training keeps the eager cells). ``"auto"`` (the
            default): on CUDA tensors, where launches set a step's time; the eager reference elsewhere. If the
            fused backend fails to compile, an ``"auto"`` module warns once, naming why, and runs the reference
            from then on (True raises :class:`~lightning_revrnn.core.errors.FusedPathError`). Exact, but its
            float gates may differ from eager ones in the last bits (slightly different trajectories). Each
            new shape compiles once (seconds). Settable between windows as ``rnn.fused``.

    ``out, h_n = rnn(x, hx=None, head=None, stem=None, keep=None)``: as ``nn.GRU``/``nn.LSTM`` (the same result
    dtypes under autocast; inside, the cells always compute in exact float32 fixed point). ``h_n`` carries
    exactly into the next window when passed back as ``hx`` (:mod:`~lightning_revrnn.core.carry`); for a state
    that must outlive the module (a checkpoint) use :meth:`exact_state`. With ``head`` (a bound
    :class:`~lightning_revrnn.core.protocol.StepHead`) the first return value is the head's sum over the
    window; with ``stem`` (a bound :class:`~lightning_revrnn.core.protocol.StepStem`) ``x`` is what the stem
    reads per step (e.g. token ids ``(T, B)``). ``keep`` (bool ``(T, B)``, or ``(B, T)`` with
    ``batch_first``) marks the steps each example really takes: elsewhere its state and buffer stay bit for
    bit as they were and no gradient flows; with right padding ``h_n`` is each example's state after its last
    real step (a head must mask its own loss at padded steps). :meth:`memory_stats` gives the last training
    window's accounting.

    Example::

        >>> import torch
        >>> rnn = RevGRU(input_size=8, hidden_size=16, num_layers=2)
        >>> x = torch.randn(35, 4, 8, requires_grad=True)  # (time, batch, features)
        >>> out, h_n = rnn(x)
        >>> out.shape, h_n.shape
        (torch.Size([35, 4, 16]), torch.Size([2, 4, 16]))
        >>> out.sum().backward()  # the reverse sweep: states reconstructed, not stored
        >>> rnn.memory_stats().actual_ratio > 1
        True
    """

    cell_class: type[ReversibleCell]
    #: Where the matching ``nn`` module autocasts: device type -> its result dtype (None: the autocast dtype).
    #: Measured with torch 2.11 (CUDA, H200) and 2.13 (CPU): cuDNN's RNN returns float16 under any autocast,
    #: nn.GRU on the CPU does not autocast, nn.LSTM on the CPU (oneDNN) returns the autocast dtype.
    autocast_results: ClassVar[dict[str, torch.dtype | None]] = {"cuda": torch.float16}

    def __init__(
        self,
        input_size: int,
        hidden_size: int | Sequence[int],
        num_layers: int = 1,
        max_forget_bits: int | None = 3,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        dropconnect: float = 0.0,
        batch_first: bool = False,
        stored_units: int = 0,
        mode: Mode = "reverse",
        fused: Fused = "auto",
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, int):
            sizes = [hidden_size] * num_layers
        else:
            sizes = list(hidden_size)
            if num_layers not in (1, len(sizes)):
                raise ValueError(f"num_layers={num_layers} but hidden_size lists {len(sizes)} sizes.")
        if not sizes:
            raise ValueError("num_layers must be at least 1.")
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout), ("dropconnect", dropconnect)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}.")
        if not 0 <= stored_units <= sizes[-1] // 2:
            raise ValueError(
                f"stored_units must be between 0 and half the top layer's hidden size ({sizes[-1] // 2}): the "
                f"stored units are the first units of h1, one half of the state. Got {stored_units}."
            )
        self.stored_units = stored_units
        self.input_size = input_size
        self.hidden_sizes = sizes
        self.uniform = isinstance(hidden_size, int)
        self.num_layers = len(sizes)
        self.max_forget_bits = max_forget_bits
        self.dropout, self.input_dropout, self.dropconnect = dropout, input_dropout, dropconnect
        self.batch_first = batch_first
        self.mode = mode
        ins = [input_size, *sizes[:-1]]
        self.cells = nn.ModuleList(self.cell_class(i, h, max_forget_bits) for i, h in zip(ins, sizes))
        self.fused = fused
        self._stats: tuple[MemoryAccounting, ...] | None = None
        self._last_window: weakref.ref[WindowRecord] | None = None
        self._carry = ExactCarry()

    @property
    def mode(self) -> Mode:
        """``"reverse"`` or ``"store"``."""
        return self._mode

    @mode.setter
    def mode(self, value: Mode) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}.")
        self._mode = value

    @property
    def fused(self) -> Fused:
        """Whether the cells run on the fused backend where no autograd records (see the class docstring); a
        :class:`~lightning_revrnn.core.backend.Backend` instance runs that backend instead (benchmarks inject
        a counting one). Settable between windows, not between a forward and its backward. ``"auto"`` turns
        into False after the fused backend failed (with a warning)."""
        return self._fused

    @fused.setter
    def fused(self, value: Fused) -> None:
        self._fused = check_fused(value)

    @property
    def last_window(self) -> WindowRecord | None:
        """The last reverse-mode training window while its graph is alive (its plan and buffers), else None."""
        return None if self._last_window is None else self._last_window()

    def __getstate__(self) -> dict[str, object]:
        # The weak reference to the last window cannot be pickled (ddp_spawn, torch.save of the module).
        state = super().__getstate__()  # type: ignore[no-untyped-call]  # nn.Module's is unannotated
        return {**state, "_last_window": None, "_carry": ExactCarry()}

    @property
    def cell_list(self) -> list[ReversibleCell]:
        """The layers' cells as a typed list (``self.cells`` is their ``nn.ModuleList``)."""
        return cast(list[ReversibleCell], list(self.cells))

    @property
    def state_count(self) -> int:
        """Tensors per layer in a state: 1 (h) or 2 (h, c)."""
        return self.cell_list[0].halves_per_group

    def extra_repr(self) -> str:
        fused = "" if self.fused == "auto" else f", fused={self.fused is not False}"
        return f"mode={self.mode!r}, batch_first={self.batch_first}{fused}"

    # ------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        hx: State | tuple[State, State] | None = None,
        head: StepHead | None = None,
        stem: StepStem | None = None,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, State | tuple[State, State]]:
        x = self._check_input(x, stem)
        keep = check_keep(keep, x, self.batch_first)
        dtype = self._result_dtype(x, stem)
        if head is not None and self.stored_units:
            raise ValueError(
                "stored_units and a head do not combine: with stored units the module returns them (for an "
                "attention that reads them outside), a head reads every output inside the sweep. Fix: build the "
                "encoder with stored_units and no head, the decoder with a head and stored_units=0."
            )
        if stem is None:
            x = x.float()  # differentiable: a bf16 input gets a bf16 gradient
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]
        like = torch.empty((), device=x.device)
        init = self._initial_state(hx, B, like)
        params = [p for c in self.cell_list for p in (c.weight_ih, c.bias, c.weight_hh)]
        extras = [t for m in (head, stem) for t in (*trainable(m), *declared_context(m))]
        needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (x, *init, *params)) or bool(extras))
        reverse = needs_grad and self.mode == "reverse"
        plan = WindowPlan.build(
            self.cell_list,
            backend_for(self._fused, differentiable=needs_grad and not reverse, device=x.device),
            self._input_masks(B, like),
            [self._dropconnect_mask(c, like) for c in self.cell_list],
            retain=needs_grad,
            autocast=AutocastState.capture(x.device),
            head=head,
            stem=stem,
            keep=keep,
            stored_units=self.stored_units,
        )
        if reverse:
            check_declared_inputs(head, stem, plan.autocast, x, self.hidden_sizes[-1])
        try:
            primary, finals, buffers, final_exact = self._window(plan, x, init, params, reverse)
        except FusedPathError as failure:
            if self._fused != "auto" or plan.backend is EAGER:
                raise
            plan = self._fall_back(plan, failure)
            primary, finals, buffers, final_exact = self._window(plan, x, init, params, reverse)
        if needs_grad:
            self._stats = tuple(  # per layer; summed when read, so the forward adds no op for it
                buf.stats(32 * T * B * c.hidden_size * c.halves_per_group, stored_bits=32 * T * B * plan.stored(l))
                for l, (buf, c) in enumerate(zip(buffers, self.cell_list))
            )
        if head is None:
            primary = primary.to(dtype)
            primary = primary.transpose(0, 1) if self.batch_first else primary
        h_n = self._pack_state([f.to(dtype) for f in finals])
        self._carry.remember(self._flat_state(h_n), final_exact)
        return primary, h_n

    def _window(
        self, plan: WindowPlan, x: Tensor, init: list[Tensor], params: Sequence[Tensor], reverse: bool
    ) -> tuple[Tensor, list[Tensor], list[InformationBuffer], list[Tensor]]:
        """Run the window (by reversal or through autograd): the primary result, the final states (float32),
        the buffers and the exact final state."""
        if reverse:
            args = (plan, self.state_count, x, *init, *params, *plan.extras)
            res = ReverseSweep.apply(*args)  # type: ignore[no-untyped-call]  # Function.apply is unannotated
            record: WindowRecord = res[-1]
            self._last_window = weakref.ref(record)  # the graph owns the record until backward frees it
            return res[0], list(res[1:-1]), record.buffers, record.final_exact
        result = self._forward_autograd(plan, x, init)
        self._last_window = None
        return result.primary, result.finals, result.buffers, result.final_exact

    def _fall_back(self, plan: WindowPlan, failure: FusedPathError) -> WindowPlan:
        """``fused="auto"`` and the fused backend failed: warn once, run the reference from now on."""
        warn_fallback(type(self).__name__, failure)
        self._fused = False
        return dataclasses.replace(plan, backend=EAGER)

    def _result_dtype(self, x: Tensor, stem: StepStem | None) -> torch.dtype:
        """The dtype ``nn.GRU``/``nn.LSTM`` would return (see :attr:`autocast_results`)."""
        kind = x.device.type
        if kind in self.autocast_results and torch.is_autocast_enabled(kind):
            return self.autocast_results[kind] or torch.get_autocast_dtype(kind)
        return torch.float32 if stem is not None else x.dtype

    def _forward_autograd(self, plan: WindowPlan, x: Tensor, init: list[Tensor]) -> WindowResult:
        """Evaluation and ``mode="store"``: the same forward, autograd recording it if grad is on."""
        n = self.state_count
        halves = [c.split_state(init[l * n : (l + 1) * n]) for l, c in enumerate(self.cell_list)]
        state = [[to_fixed(h.detach()) for h in hs] for hs in halves]
        state_f = [[straight_through_init(i, h) for i, h in zip(ints, hs)] for ints, hs in zip(state, halves)]
        return run_forward(plan, x, state, state_f, init)

    # ---------------------------------------------------------------------------------- exact carry
    def exact_state(self, state: State | tuple[State, State]) -> State | tuple[State, State]:
        """The exact (float64, detached) value of a state this module returned, in the same layout.

        ``state`` must be a returned ``h_n`` (or a view of it, see the class docstring) of one of the last
        few forwards; elsewhere its own value is returned. Passing the result as ``hx`` continues bit for
        bit, also after a restart (save it in a checkpoint instead of ``h_n``)."""
        flat = self._flat_state(state)
        return self._pack_state([t.detach() for t in self._carry.resolve(flat)])

    def _flat_state(self, state: State | tuple[State, State]) -> list[Tensor]:
        """Per-layer ``(B, H_l)`` tensors in the sweep's order (h, or h and c per layer), unchecked."""
        n = self.state_count
        kinds = list(cast(tuple[State, State], state)) if n == 2 else [cast(State, state)]
        per_kind = [list(k.unbind(0)) if isinstance(k, Tensor) else list(k) for k in kinds]
        return [per_kind[k][l] for l in range(len(per_kind[0])) for k in range(n)]

    # ------------------------------------------------------------------------------------ accounting
    def memory_stats(self) -> MemoryAccounting:
        """The paper's accounting for the last training window (spec section 4): the total over layers, with
        each layer's in ``layers`` (see :class:`~lightning_revrnn.core.accounting.MemoryAccounting`). Raises
        ``RuntimeError`` before the first forward with gradients."""
        if self._stats is None:
            raise RuntimeError("memory_stats() describes the last training window: run a forward with grad first.")
        return MemoryAccounting.total(self._stats)

    # ------------------------------------------------------------------------------------ validation
    def _check_input(self, x: Tensor, stem: StepStem | None) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor input, got {type(x).__name__}.")
        if stem is not None:
            if x.dim() < 2 or x.shape[0] == 0 or x.shape[1] == 0:
                raise ValueError(f"With a stem, x must be (time, batch, ...) and non-empty, got {tuple(x.shape)}.")
            check_float32_parameters(self)
            return x
        layout = "(batch, time, features)" if self.batch_first else "(time, batch, features)"
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects a 3-D input {layout}, got shape {tuple(x.shape)}.")
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"Input has {x.shape[-1]} features but the module was built with input_size={self.input_size}."
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"Input {layout} has an empty dimension: shape {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}.")
        check_float32_parameters(self)
        return x

    def _initial_state(self, hx: State | tuple[State, State] | None, batch: int, x: Tensor) -> list[Tensor]:
        """Flat list of per-layer ``(B, H_l)`` tensors (h, or h and c per layer); their range is checked
        with the window's (:class:`~lightning_revrnn.core.fixed_point.RangeGuard`)."""
        n = self.state_count
        if hx is None:
            return [x.new_zeros(batch, h) for h in self.hidden_sizes for _ in range(n)]
        parts: list[State] = list(cast(tuple[State, State], hx)) if n == 2 else [cast(State, hx)]
        if n == 2 and len(parts) != 2:
            raise ValueError("RevLSTM expects hx = (h, c).")
        per_kind = [self._layers_of(p, batch) for p in parts]
        return self._carry.resolve([per_kind[k][l] for l in range(self.num_layers) for k in range(n)])

    def _layers_of(self, s: State, batch: int) -> list[Tensor]:
        layers = list(s.unbind(0)) if isinstance(s, Tensor) and s.dim() == 3 else s
        if isinstance(layers, Tensor) or len(layers) != self.num_layers:
            raise ValueError(
                f"hx must hold one (batch, hidden) state per layer ({self.num_layers} layers): a tensor "
                f"(num_layers, batch, hidden) or a list of (batch, hidden_l) tensors."
            )
        for l, (t, h) in enumerate(zip(layers, self.hidden_sizes)):
            if not isinstance(t, Tensor) or tuple(t.shape) != (batch, h):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"hx for layer {l} must have shape {(batch, h)}, got {got}.")
            if not t.is_floating_point():
                raise TypeError(f"hx for layer {l} must be a float tensor, got {t.dtype}.")
        return list(layers)

    def _pack_state(self, finals: list[Tensor]) -> State | tuple[State, State]:
        n = self.state_count
        kinds: list[State] = []
        for k in range(n):
            layers = finals[k::n]
            kinds.append(torch.stack(layers) if self.uniform else layers)
        return kinds[0] if n == 1 else (kinds[0], kinds[1])

    def _input_masks(self, batch: int, x: Tensor) -> list[Tensor | None]:
        sizes = [self.input_size, *self.hidden_sizes[:-1]]
        probs = [self.input_dropout] + [self.dropout] * (self.num_layers - 1)
        return [self._mask((batch, s), p, x) for s, p in zip(sizes, probs)]

    def _dropconnect_mask(self, cell: ReversibleCell, like: Tensor) -> SeededMask | None:
        """DropConnect on the cell's hidden-to-hidden weights: a seed, redrawn in forward and reverse."""
        if not self.training or self.dropconnect == 0.0:
            return None
        return SeededMask.sample(tuple(cell.weight_hh.shape), self.dropconnect, like.device)

    def _mask(self, shape: tuple[int, ...] | torch.Size, p: float, like: Tensor) -> Tensor | None:
        """A locked dropout mask, scaled by 1/(1-p); None in evaluation or when p = 0."""
        return locked_mask(shape, p, like) if self.training else None


def straight_through_init(ints: Tensor, given: Tensor) -> Tensor:
    """The initial float half: exactly ``to_float(ints)``, with the gradient of the caller's ``hx``."""
    return straight_through(to_float(ints), given.float())


class RevGRU(ReversibleRNN):
    """Reversible GRU (:class:`~lightning_revrnn.core.cells.RevGRUCell` layers). ``hx``/``h_n``: h.

    Example::

        >>> rnn = RevGRU(input_size=3, hidden_size=4, num_layers=2, batch_first=True)
        >>> out, h_n = rnn(torch.randn(2, 5, 3))  # (batch, time, features)
        >>> out.shape, h_n.shape  # h_n stays (layers, batch, hidden), as nn.GRU's
        (torch.Size([2, 5, 4]), torch.Size([2, 2, 4]))
    """

    cell_class = RevGRUCell


class RevLSTM(ReversibleRNN):
    """Reversible LSTM (:class:`~lightning_revrnn.core.cells.RevLSTMCell` layers). ``hx``/``h_n``: (h, c).

    Example::

        >>> rnn = RevLSTM(input_size=3, hidden_size=4, num_layers=2)
        >>> out, (h_n, c_n) = rnn(torch.randn(5, 2, 3))  # as nn.LSTM: the final (h, c)
        >>> out.shape, h_n.shape, c_n.shape
        (torch.Size([5, 2, 4]), torch.Size([2, 2, 4]), torch.Size([2, 2, 4]))
    """

    cell_class = RevLSTMCell
    autocast_results: ClassVar[dict[str, torch.dtype | None]] = {"cuda": torch.float16, "cpu": None}


class NFRevGRU(ReversibleRNN):
    """No-forgetting RevGRU: exactly invertible by additive coupling alone (no buffer).

    Example::

        >>> rnn = NFRevGRU(input_size=3, hidden_size=4)
        >>> out, h_n = rnn(torch.randn(5, 2, 3))
        >>> out.sum().backward()  # states reconstructed by subtraction alone
        >>> rnn.memory_stats().used_bits  # so nothing is buffered
        0
    """

    cell_class = NFRevGRUCell


class NFRevLSTM(ReversibleRNN):
    """No-forgetting RevLSTM: exactly invertible by additive coupling alone (no buffer).

    Example::

        >>> rnn = NFRevLSTM(input_size=3, hidden_size=4)
        >>> out, (h_n, c_n) = rnn(torch.randn(5, 2, 3))
        >>> out, (h_n, c_n) = rnn(torch.randn(5, 2, 3), (h_n.detach(), c_n.detach()))  # the next window
        >>> out.shape, c_n.shape
        (torch.Size([5, 2, 4]), torch.Size([1, 2, 4]))
    """

    cell_class = NFRevLSTMCell
    autocast_results: ClassVar[dict[str, torch.dtype | None]] = {"cuda": torch.float16, "cpu": None}
