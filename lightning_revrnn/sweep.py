"""The time loops: the exact forward over a window, and the reverse sweep that trains by reversal.

:func:`forward_window` is the one forward: evaluation, ``mode="store"`` (autograd through it) and the
forward of ``mode="reverse"`` all run it, so every mode computes bit-identical states.
:class:`ReverseSweep` is the ``mode="reverse"`` autograd Function: its forward keeps only the buffers,
the final state, the inputs and the masks; its single backward walks the window backwards through all
layers, reconstructing each state from the next, recomputing that step's local graph, and returning the
gradients of the input, the initial state and every parameter. It checks each reconstructed state
against a checksum taken in forward and raises :class:`~lightning_revrnn.errors.ReconstructionError`
naming the first layer and step that diverged.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_revrnn.buffer import InformationBuffer
from lightning_revrnn.cells import HiddenProduct, ReversibleCell
from lightning_revrnn.dropout import SeededMask
from lightning_revrnn.errors import ReconstructionError
from lightning_revrnn.fixed_point import RangeGuard, check_range, straight_through, to_fixed, to_float


class StepHead(nn.Module, metaclass=ABCMeta):
    """An output head run inside the sweep, e.g. decoder + cross-entropy, a chunk of steps at a time.

    Subclasses implement :meth:`forward`: given the top layer's outputs ``(C, B, H)`` for steps
    ``start .. start+C-1`` of the window, return the scalar sum of the head over those steps (it must be a
    sum over steps: the sequence module returns the total over the window). The head only ever sees
    ``CHUNK`` steps at once, so no ``T × batch × vocab`` tensor exists. In ``mode="reverse"`` it runs in
    forward (for the value), then during the reverse sweep once per step with its parameters detached
    (for the gradient flowing into the RNN) and once per chunk for its own parameters' gradients. Anything
    it needs per window (targets, a dropout mask) must be set before the call and stay until backward.

    With a keep mask (padding) the head still receives every step; at a masked step the output is the
    example's unchanged state, so a head must mask its own loss there (the sequence module cannot).

    It runs under the caller's autocast (its values do not feed the reconstruction), so a decoder GEMM
    follows ``precision="bf16-mixed"``. A tensor it reads that is neither its parameter nor listed by
    :meth:`context` gets no gradient in ``mode="reverse"``: forward raises instead of training silently
    wrong (see :func:`check_declared_inputs`).
    """

    @abstractmethod
    def forward(self, output: Tensor, start: int) -> Tensor:
        """The scalar sum of the head over steps ``start .. start + len(output) - 1``."""

    def context(self) -> Sequence[Tensor]:
        """Tensors the head reads that are not its parameters (an attention memory, an encoder output).

        ``mode="reverse"`` passes those that require grad through the sweep as inputs, so they receive the
        same gradient as in ``mode="store"`` (summed over the window). Return the very tensors the head
        reads (not copies), set before the call and unchanged until backward. Default: none.
        """
        return ()


#: Steps per chunk of first-layer input projections (one GEMM per chunk instead of one per step).
CHUNK = 16


class StepStem(nn.Module, metaclass=ABCMeta):
    """A per-step input stem run inside the sweep, e.g. embedding lookup + locked dropout of step ``t``.

    With a stem the sequence module's input is whatever the stem reads (token ids ``(T, B)``, say) and
    :meth:`forward` maps a chunk of steps of it (leading dims ``(T', B)``) to the first layer's input
    ``(T', B, input_size)``, elementwise in time. In
    ``mode="reverse"`` the stem runs again for each step of the reverse sweep, so the ``T × B × input``
    tensor it produces is never held between forward and backward. It must be deterministic within a
    window (sample any dropout mask before the call).

    It runs under the caller's autocast; its output is cast to float32 before the first layer's
    projection, and the reverse sweep re-enters the autocast state recorded in forward, so the projection
    is recomputed bit for bit. Tensors it reads that are not its parameters go in :meth:`context`.
    """

    @abstractmethod
    def forward(self, inputs: Tensor) -> Tensor:
        """The first layer's input ``(T', B, input_size)`` for ``inputs`` of leading dims ``(T', B)``."""

    def context(self) -> Sequence[Tensor]:
        """Tensors the stem reads that are not its parameters; as :meth:`StepHead.context`. Default: none."""
        return ()

    def accumulate_grads(
        self, inputs: Tensor, output: Tensor, d_output: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> None:
        """Reverse sweep: add the gradient of ``(output · d_output).sum()`` with respect to each target
        tensor into its accumulator. ``output`` is this module's (float32) output for ``inputs``, one chunk
        of steps, with its graph. Override for a cheaper form (:class:`~lightning_revrnn.lm.EmbeddingStem`
        adds its rows by ``index_add_`` instead of a dense ``V × E`` gradient per chunk)."""
        if targets:
            grads = torch.autograd.grad(output, [t for t, _ in targets], d_output, allow_unused=True)
            for (_, acc), g in zip(targets, grads):
                if g is not None:
                    acc.add_(g)


@dataclass(frozen=True)
class AutocastState:
    """The caller's autocast for one device type, recorded in forward and re-entered by the reverse sweep
    around the stem and the head (the cells always compute with autocast off)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        """The autocast state in effect now for ``device``'s type."""
        kind = device.type
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))

    def enter(self) -> contextlib.AbstractContextManager[None]:
        """A context that re-enters this state (nothing to do when autocast was off)."""
        if not self.enabled:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=True)


def matmul_precision_state() -> tuple[str, ...]:
    """The float32 matmul precision settings, read with the per-backend API where it exists (reading the
    legacy global after the new API was used raises "mix of the legacy and new APIs")."""
    backends = torch.backends
    try:
        return (
            str(backends.fp32_precision),  # type: ignore[attr-defined]
            str(backends.cuda.matmul.fp32_precision),  # type: ignore[attr-defined]
            str(backends.mkldnn.matmul.fp32_precision),  # type: ignore[attr-defined]
        )
    except AttributeError:  # a torch without the per-backend API
        return (torch.get_float32_matmul_precision(),)


@dataclass
class Window:
    """Everything one window's forward and reverse share (host objects, not differentiated).

    ``extras`` are the tensors besides the cells' parameters that the sweep returns gradients for: the
    head's and stem's trainable parameters and declared context, each once (a tied embedding/decoder
    weight is one entry, so one accumulator); ``head_slots``/``stem_slots`` index into it.
    """

    cells: list[ReversibleCell]
    input_masks: list[Tensor | None]
    hidden_masks: list[SeededMask | None]
    retain: bool
    head: StepHead | None = None
    stem: StepStem | None = None
    autocast: AutocastState = AutocastState("cpu", False, torch.bfloat16)
    buffers: list[InformationBuffer] = field(default_factory=list)
    guards: list[RangeGuard] = field(default_factory=list)
    extras: list[Tensor] = field(default_factory=list)
    head_slots: list[int] = field(default_factory=list)
    stem_slots: list[int] = field(default_factory=list)
    #: The exact final state (float64, one tensor per ``h``/``c`` per layer) after a forward.
    final_exact: list[Tensor] = field(default_factory=list)
    #: Padding: ``(T, B, 1)`` bool, False where example ``b`` skips step ``t`` (state and buffer untouched);
    #: None: every step of every example runs. Forward and the reverse sweep read the same tensor.
    keep: Tensor | None = None

    def __post_init__(self) -> None:
        self.extras, self.head_slots = [], []
        for t in [*trainable(self.head), *_context(self.head)]:
            self.head_slots.append(_slot(self.extras, t))
        self.stem_slots = [_slot(self.extras, t) for t in [*trainable(self.stem), *_context(self.stem)]]

    def start(self, batch: int, device: torch.device) -> None:
        """Fresh (empty) buffers and guards for a new window."""
        self.buffers = [
            InformationBuffer((batch, c.half_size), device, c.max_forget_bits, self.retain) for c in self.cells
        ]
        self.guards = [RangeGuard() for _ in self.cells]

    def chunk_input(self, inputs: Tensor, t0: int, t1: int) -> Tensor:
        """The first layer's float32 input for steps ``t0..t1-1`` (through the stem, if any, under the
        caller's autocast), before input dropout."""
        if self.stem is None:
            return inputs[t0:t1]
        with self.autocast.enter():
            return self.stem(inputs[t0:t1]).float()

    def head_value(self, head: Callable[[Tensor, int], Tensor], output: Tensor, start: int) -> Tensor:
        """The head (or a functional call of it) on ``output``, under the caller's autocast."""
        with self.autocast.enter():
            return cast(Tensor, head(output, start))

    def first_projection(self, inputs: Tensor, t0: int, t1: int) -> Tensor:
        """The first layer's input pre-activations for one chunk ``(t1-t0, B, rows)``: one GEMM over the
        chunk, computed identically in forward and reverse (chunks always start at multiples of CHUNK)."""
        return self.cells[0].project_input(self.layer_input(0, self.chunk_input(inputs, t0, t1)))

    def step_keep(self, t: int) -> Tensor | None:
        """Step ``t``'s keep mask ``(B, 1)`` for every layer's cell, or None without padding."""
        return None if self.keep is None else self.keep[t]

    def hidden_weights(self, layer: int) -> Tensor:
        """The layer's hidden-to-hidden weights for this window (DropConnect mask redrawn from its seed)."""
        cell, mask = self.cells[layer], self.hidden_masks[layer]
        return cell.weight_hh if mask is None else cell.weight_hh * mask.materialize()

    def layer_input(self, layer: int, x: Tensor) -> Tensor:
        """Apply the layer's locked dropout mask (inputs for layer 0, between layers above)."""
        mask = self.input_masks[layer]
        return x if mask is None else x * mask


def _context(module: StepHead | StepStem | None) -> list[Tensor]:
    """The module's declared context tensors that need a gradient."""
    return [] if module is None else [t for t in module.context() if t.requires_grad]


def _slot(extras: list[Tensor], t: Tensor) -> int:
    """Index of ``t`` in ``extras`` (by identity), appending it the first time."""
    for i, e in enumerate(extras):
        if e is t:
            return i
    extras.append(t)
    return len(extras) - 1


def check_declared_inputs(window: Window, x: Tensor, batch: int) -> None:
    """Raise if the head or stem reads a tensor that requires grad but is neither its parameter nor in its
    ``context()``: the reverse sweep would return no gradient for it (``mode="store"`` would).

    Costs one step of each: the module runs on a detached one-step input with its parameters detached
    (``functional_call``); whatever still requires grad in the value comes from elsewhere, and the graph
    is walked until it meets a leaf that is not declared.
    """
    with torch.enable_grad():
        if window.stem is not None:
            stem = window.stem
            frozen = {n: p.detach() for n, p in stem.named_parameters()}
            with window.autocast.enter():
                value = functional_call(stem, frozen, (x[:1].detach(),))
            _raise_if_undeclared(stem, "StepStem", value, list(stem.context()))
        if window.head is not None:
            head, top = window.head, window.cells[-1]
            frozen = {n: p.detach() for n, p in head.named_parameters()}
            zeros = torch.zeros(1, batch, top.hidden_size, device=x.device)
            value = window.head_value(lambda o, s: functional_call(head, frozen, (o, s)), zeros, 0)
            _raise_if_undeclared(head, "StepHead", value, list(head.context()))


def _raise_if_undeclared(module: nn.Module, kind: str, value: Tensor, declared: list[Tensor]) -> None:
    if not isinstance(value, Tensor) or not value.requires_grad:
        return
    undeclared = _undeclared_leaf(value, declared)
    if undeclared is None:
        return
    name = type(module).__name__
    raise RuntimeError(
        f"{kind} {name} reads a tensor that requires grad but is neither its parameter nor listed by its "
        f"context() (its graph reaches a leaf of shape {tuple(undeclared.shape)}): mode='reverse' would give it "
        "no gradient (mode='store' would). "
        f"Fix: return that tensor (the one the {kind.lower()[4:]} reads, e.g. an attention memory or encoder "
        f"output) from {name}.context(), register it as a parameter of {name}, or detach it if it needs no "
        "gradient."
    )


def _undeclared_leaf(value: Tensor, declared: list[Tensor]) -> Tensor | None:
    """The first leaf tensor the graph of ``value`` reaches without passing through a declared tensor."""
    stops = {id(t.grad_fn) for t in declared if t.grad_fn is not None}
    leaves = {id(t) for t in declared if t.grad_fn is None}
    stack, seen = [value.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in stops:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # AccumulateGrad: a leaf
            if id(variable) not in leaves:
                return variable
            continue
        stack.extend(n for n, _ in node.next_functions)
    return None


def split_state(cell: ReversibleCell, full: list[Tensor]) -> list[Tensor]:
    """``[h]`` or ``[h, c]`` of shape (B, H) to the cell's list of halves."""
    halves = [cell.split_output(s) for s in full]
    return [halves[j][i] for j in range(len(full)) for i in (0, 1)]


def join_state(full_count: int, halves: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`split_state`."""
    return [torch.cat(halves[2 * j : 2 * j + 2], 1) for j in range(full_count)]


@functools.lru_cache(maxsize=16)
def _mix(shape: torch.Size, device: torch.device) -> Tensor:
    """Odd position weights for :func:`state_checksum` (a bounded cache: a few shapes per model)."""
    numel = shape.numel()
    return torch.arange(1, 2 * numel + 1, 2, device=device, dtype=torch.int64).view(shape)


def state_checksum(state: list[Tensor]) -> Tensor:
    """An int64 fingerprint of a state: a position-weighted sum of all halves, exact modulo 2^64."""
    flat = torch.stack(state)
    return (flat * _mix(flat.shape, flat.device)).sum()


@contextlib.contextmanager
def cells_context(device: torch.device) -> Iterator[None]:
    """Autocast off: the cells compute in float32, so forward and reverse round alike. (The float32 matmul
    precision is not touched: forward records it and backward checks it, see :class:`ReverseSweep`.)"""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def forward_window(
    window: Window, x: Tensor, state: list[list[Tensor]], state_f: list[list[Tensor]],
    out: Tensor | None = None, checksums: Tensor | None = None,
) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor | list[Tensor]]:
    """Run the window forward (the cells with autocast off, the stem and head under the caller's).
    Returns the final (int, float) states and the outputs.

    The outputs are the top layer's float outputs per step (written into ``out`` when given, else a list
    of tensors that keep their graph), or the per-step head values when the window has a head.
    ``checksums[t + 1, l]`` receives the fingerprint of layer ``l``'s state after step ``t``.
    """
    with cells_context(x.device):
        return _forward_window(window, x, state, state_f, out, checksums)


def _forward_window(
    window: Window, x: Tensor, state: list[list[Tensor]], state_f: list[list[Tensor]],
    out: Tensor | None, checksums: Tensor | None,
) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor | list[Tensor]]:
    weights = [list(window.hidden_weights(l).split(c.hidden_rows, 0)) for l, c in enumerate(window.cells)]
    results: list[Tensor] = []
    inp: Tensor
    T = x.shape[0]
    for t in range(T):
        if t % CHUNK == 0:
            t0, t1 = t, min(t + CHUNK, T)
            xp0 = window.first_projection(x, t0, t1)
            chunk_out: list[Tensor] = []
        keep = window.step_keep(t)
        for l, cell in enumerate(window.cells):
            xp = xp0[t % CHUNK] if l == 0 else cell.project_input(window.layer_input(l, inp))
            state[l], state_f[l] = cell.forward_step(
                weights[l], xp, state[l], state_f[l], window.buffers[l], window.guards[l], keep
            )
            if checksums is not None:
                checksums[t + 1, l] = state_checksum(state[l])
            inp = cell.output(state_f[l])
        if window.head is not None:
            chunk_out.append(inp)
            if t == t1 - 1:
                results.append(window.head_value(window.head, torch.stack(chunk_out), t0))
        elif out is not None:
            out[t] = inp
        else:
            results.append(inp)
    for buf in window.buffers:
        buf.finish()  # the window's one host read per buffer: compact the drains decided on the device
    for l, guard in enumerate(window.guards):
        guard.check(f"layer {l}")
    return state, state_f, (out if out is not None and window.head is None else results)


def exact_final_state(cell: ReversibleCell, ints: list[Tensor], floats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The final state per ``h``/``c``: float32 (the correctly rounded value, carrying the float
    surrogate's gradient) and float64 (exact, detached, for an exact carry into the next window)."""
    exact = [to_float(i, torch.float64) for i in ints]
    for k, h in enumerate(exact):
        check_range(h, f"final state half {k}")
    rounded = [straight_through(to_float(i), f) for i, f in zip(ints, floats)]
    return join_state(cell.halves_per_group, rounded), join_state(cell.halves_per_group, exact)


SECOND_BACKWARD = (
    "A reversible RNN in mode='reverse' supports one backward per forward: the reverse sweep consumes the "
    "information buffer (and frees what it saved). The usual cause is a final state carried into the next "
    "window without detaching it, so the next backward runs through this window again. Fix: carry "
    "hx = h_n.detach() (truncated BPTT), or use mode='store' for a second backward through the same graph "
    "(retain_graph=True, double backward)."
)


class ReverseSweep(torch.autograd.Function):
    """Training by reversal. ``apply(window, n_state, x, *states, *cell_params, *window.extras)``.

    ``state_tensors`` are the initial states (float, ``(B, H)`` each; per layer ``h`` or ``h, c``),
    ``cell_params`` the cells' parameters in :meth:`_layer_params` order, ``extras`` the head's and stem's
    parameters and context (see :class:`Window`). Returns the outputs (``(T, B, H_top)``) or, with a head,
    the summed head value, followed by the final states (float32; the exact ones go to
    ``window.final_exact``).
    """

    @staticmethod
    def forward(ctx: Any, window: Window, n_state: int, x: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        cells = window.cells
        h0 = [split_state(c, list(flat[l * n_state : (l + 1) * n_state])) for l, c in enumerate(cells)]
        state = [[to_fixed(h) for h in hs] for hs in h0]
        state_f = [[to_float(s) for s in st] for st in state]
        T, B = x.shape[0], x.shape[1]
        checksums = torch.zeros(T + 1, len(cells), dtype=torch.int64, device=x.device)
        for l, st in enumerate(state):
            checksums[0, l] = state_checksum(st)
        out = None if window.head is not None else torch.empty(T, B, cells[-1].hidden_size, dtype=torch.float32, device=x.device)
        window.start(B, x.device)
        ctx.precision = matmul_precision_state()
        state, state_f, res = forward_window(window, x, state, state_f, out, checksums)
        finals = [exact_final_state(c, s, f) for c, s, f in zip(cells, state, state_f)]
        window.final_exact = [e for _, exact in finals for e in exact]
        ctx.window, ctx.n_state = window, n_state
        ctx.n_final = [len(s) for s in state]
        masks = [m for m in [*window.input_masks, window.keep] if m is not None]
        ctx.save_for_backward(
            x, checksums, *[h for s in state for h in s], *masks,
            *[t for b in window.buffers for t in b.tensors()],
        )
        # With a head the outputs are the per-step head values; without one they were written into ``out``.
        primary = torch.stack(cast(list[Tensor], res)).sum() if window.head is not None else cast(Tensor, out)
        return (primary, *[f for rounded, _ in finals for f in rounded])

    @staticmethod
    def backward(ctx: Any, grad_primary: Tensor, *grad_final: Tensor) -> tuple[Tensor | None, ...]:
        window: Window = ctx.window
        cells, n_state = window.cells, ctx.n_state
        if getattr(ctx, "swept", False) and any(c.forgets for c in cells):
            raise RuntimeError(SECOND_BACKWARD)
        try:
            saved = ctx.saved_tensors
        except RuntimeError as freed:  # a second backward without retain_graph
            raise RuntimeError(SECOND_BACKWARD) from freed
        ctx.swept = True
        precision = matmul_precision_state()
        if precision != ctx.precision:
            raise ReconstructionError(
                f"The float32 matmul precision changed between forward and backward ({ctx.precision} -> "
                f"{precision}), so the reverse sweep cannot redo forward's arithmetic. Fix: set "
                "torch.backends.cuda.matmul.fp32_precision (or torch.set_float32_matmul_precision) once, before "
                "training, not between a forward and its backward."
            )
        # Saved: x, the checksums (initial state and every step), the final int halves; masks and buffer
        # tensors follow only so that saved-tensor hooks see everything the sweep keeps alive (the window
        # holds the same objects).
        x, checksums = saved[0], saved[1]
        pos, state = 2, []
        for n in ctx.n_final:
            state.append(list(saved[pos : pos + n]))
            pos += n
        with torch.enable_grad(), cells_context(x.device):
            return _reverse(ctx, window, x, checksums, state, grad_primary, grad_final, n_state)


def trainable(module: nn.Module | None) -> list[Tensor]:
    """Parameters of an optional head or stem that take gradients, in a fixed order."""
    return [] if module is None else [p for p in module.parameters() if p.requires_grad]


def _reverse(
    ctx: Any, window: Window, x: Tensor, checksums: Tensor, state: list[list[Tensor]], grad_primary: Tensor,
    grad_final: tuple[Tensor, ...], n_state: int,
) -> tuple[Tensor | None, ...]:
    """The reverse sweep: walk the window backwards, step by step through all layers (top first),
    reconstructing each state and accumulating gradients; weight gradients are formed once per chunk."""
    cells, head = window.cells, window.head
    T, L = x.shape[0], len(cells)
    state = [list(s) for s in state]
    # Hidden weights: the same (DropConnect-masked) tensors as in forward; their gradient is formed from the
    # recorded hidden products (d_w) and sent through the mask once at the end.
    hidden_full = [window.hidden_weights(l) for l in range(L)]
    w_groups = [[w.detach() for w in hw.split(c.hidden_rows, 0)] for c, hw in zip(cells, hidden_full)]
    d_w = [[torch.zeros_like(w) for w in ws] for ws in w_groups]
    d_ih = [torch.zeros_like(c.weight_ih) for c in cells]
    d_bias = [torch.zeros_like(c.bias) for c in cells]
    head_frozen = None if head is None else {n: p.detach() for n, p in head.named_parameters()}
    # One accumulator per extra tensor (a tied weight read by both head and stem is one entry).
    d_extra = [torch.zeros_like(e) for e in window.extras]
    head_targets = [window.extras[i] for i in window.head_slots]
    stem_targets = [(window.extras[i], d_extra[i]) for i in window.stem_slots]
    grads: list[list[Tensor]] = []
    for l, c in enumerate(cells):
        gs = [torch.zeros(x.shape[1], c.hidden_size, device=x.device) if g is None else g.float() for g in
              grad_final[l * n_state : (l + 1) * n_state]]
        grads.append(split_state(c, gs))
    dx = torch.zeros_like(x) if ctx.needs_input_grad[2] else None
    diverged = torch.zeros(T, L, dtype=torch.bool, device=x.device)
    for t in range(T - 1, -1, -1):
        if t == T - 1 or t % CHUNK == CHUNK - 1:  # entering a chunk from its end
            t0, t1 = t - t % CHUNK, t + 1
            x_chunk = x[t0:t1]
            if dx is not None and window.stem is not None:  # a leaf of the chunk's recomputed stem graph
                x_chunk = x_chunk.detach().requires_grad_()
            x0 = window.chunk_input(x_chunk, 0, t1 - t0)
            in0 = window.layer_input(0, x0.detach())
            with torch.no_grad():
                xp0 = cells[0].project_input(in0)
            d_xp0 = torch.zeros_like(xp0)
            deferred: list[list[tuple[Tensor, Tensor]]] = [[] for _ in cells]
            products: list[list[list[HiddenProduct]]] = [[[], []] for _ in cells]
            head_inputs: list[Tensor] = []
        inputs: list[Tensor] = [in0]  # layer 0 uses its chunk
        for l in range(1, L):
            inputs.append(window.layer_input(l, cells[l - 1].output([to_float(h) for h in state[l - 1][:2]])))
        top = cells[-1]
        if head is not None:
            # The gradient into the RNN now; the head's own parameters once per chunk, below.
            out_leaf = top.output([to_float(h) for h in state[-1][:2]]).requires_grad_()
            frozen = cast(dict[str, Tensor], head_frozen)
            value = window.head_value(lambda o, s: functional_call(head, frozen, (o, s)), out_leaf[None], t)
            d_out = torch.autograd.grad(value, out_leaf, grad_primary, allow_unused=True)[0]
            d_out = torch.zeros_like(out_leaf) if d_out is None else d_out
            head_inputs.append(out_leaf.detach())
        else:
            d_out = grad_primary[t]
        for i, g in enumerate(top.split_output(d_out)):
            grads[-1][i] = grads[-1][i] + g
        keep = window.step_keep(t)
        for l in range(L - 1, -1, -1):
            cell = cells[l]
            if l == 0:
                xp = xp0[t - t0]
            else:
                with torch.no_grad():
                    xp = cell.project_input(inputs[l])
            state[l], grads[l], d_xp, step_products = cell.reverse_step(
                w_groups[l], xp, state[l], grads[l], window.buffers[l], keep
            )
            diverged[t, l] = state_checksum(state[l]) != checksums[t, l]
            for group, ps in zip(products[l], step_products):
                group.extend(ps)
            if l == 0:
                d_xp0[t - t0] = d_xp
                continue
            deferred[l].append((d_xp, inputs[l]))  # input-weight gradient: one GEMM per chunk below
            d_in = _masked(d_xp @ cell.weight_ih, window.input_masks[l])
            for i, g in enumerate(cells[l - 1].split_output(d_in)):
                grads[l - 1][i] = grads[l - 1][i] + g
        if t == t0:  # leaving the chunk: its weight gradients and the first layer's input gradient
            for l in range(L):
                for acc, group in zip(d_w[l], products[l]):
                    _hidden_weight_grads(acc, group)
            for l in range(1, L):
                d_xps, ins = zip(*reversed(deferred[l]))
                _linear_param_grads(d_ih[l], d_bias[l], torch.stack(d_xps), torch.stack(ins))
            _linear_param_grads(d_ih[0], d_bias[0], d_xp0, in0)
            d_x0 = _masked(d_xp0 @ cells[0].weight_ih, window.input_masks[0])
            if head_targets:  # the head's parameters and context: one call per chunk
                value = window.head_value(cast(StepHead, head), torch.stack(head_inputs[::-1]), t0)
                d_head = torch.autograd.grad(value, head_targets, grad_primary, allow_unused=True)
                _accumulate([d_extra[i] for i in window.head_slots], d_head)
            if window.stem is None:
                if dx is not None:
                    dx[t0:t1] = d_x0
            else:
                targets = stem_targets + ([(x_chunk, dx[t0:t1])] if dx is not None else [])
                window.stem.accumulate_grads(x_chunk, x0, d_x0, targets)
    _check_reconstruction(window, diverged)
    params_grads: list[Tensor | None] = []
    for l, c in enumerate(cells):
        d_hidden = torch.autograd.grad(hidden_full[l], c.weight_hh, torch.cat(d_w[l], 0))[0]
        params_grads += [d_ih[l], d_bias[l], d_hidden]
    d_state: list[Tensor | None] = []
    for l, c in enumerate(cells):
        d_state += join_state(c.halves_per_group, grads[l])
    return (None, None, dx, *d_state, *params_grads, *d_extra)


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


def _hidden_weight_grads(d_weight: Tensor, products: list[HiddenProduct]) -> None:
    """Accumulate a group's hidden-weight gradient over a chunk: one GEMM per weight slice."""
    by_rows: dict[tuple[int, int], list[HiddenProduct]] = {}
    for p in products:
        by_rows.setdefault((p.start, p.stop), []).append(p)
    for (start, stop), ps in by_rows.items():
        grads = torch.cat([cast(Tensor, p.grad) for p in ps])
        d_weight[start:stop].addmm_(grads.t(), torch.cat([p.inputs for p in ps]))


def _linear_param_grads(d_weight: Tensor, d_bias: Tensor, d_out: Tensor, inputs: Tensor) -> None:
    """Accumulate ``y = x Wᵀ + b`` parameter gradients over a chunk ``(C, B, ·)`` in one GEMM."""
    d_out, inputs = d_out.flatten(0, 1), inputs.flatten(0, 1)
    d_weight.addmm_(d_out.t(), inputs)
    d_bias.add_(d_out.sum(0))


def _accumulate(acc: list[Tensor], grads: tuple[Tensor | None, ...]) -> None:
    for a, g in zip(acc, grads):
        if g is not None:
            a.add_(g)


def _check_reconstruction(window: Window, diverged: Tensor) -> None:
    if bool(diverged.any()):
        bad = diverged.nonzero().tolist()
        t, l = max(bad)  # the reverse sweep meets the latest step first
        raise ReconstructionError(
            f"Reverse sweep diverged: layer {l}, reconstructing the state before step {t} did not match the "
            f"forward pass bit for bit ({len(bad)} (step, layer) states differ). The saved buffer was modified, "
            "or forward and backward ran with different numerics (autocast, TF32, threads, device)."
        )
    for l, buf in enumerate(window.buffers):
        if not buf.is_empty():
            raise ReconstructionError(f"Reverse sweep of layer {l} reached the initial state with a non-empty buffer.")
