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
from lightning_revrnn.cells import ReversibleCell, store_units
from lightning_revrnn.dropout import SeededMask
from lightning_revrnn.errors import ReconstructionError
from lightning_revrnn.fixed_point import RangeGuard, straight_through, to_fixed, to_float
from lightning_revrnn.gates import masked
from lightning_revrnn.step_backward import add_output_gradient


def add_gradients(targets: Sequence[tuple[Tensor, Tensor]], grads: Sequence[Tensor | None]) -> None:
    """Add each gradient (dense or sparse) into its ``(tensor, accumulator)`` target's accumulator; None: the
    target was not reached."""
    for (_, acc), grad in zip(targets, grads):
        if grad is not None:
            acc.add_(grad)


class StepHead(nn.Module, metaclass=ABCMeta):
    """An output head run inside the sweep, e.g. decoder + cross-entropy, a chunk of steps at a time.

    Subclasses implement :meth:`forward`: given the top layer's outputs ``(C, B, H)`` for steps
    ``start .. start+C-1`` of the window, return the scalar sum of the head over those steps (it must be a
    sum over steps: the sequence module returns the total over the window). The head only ever sees
    ``CHUNK`` steps at once, so no ``T × batch × vocab`` tensor exists. In ``mode="reverse"`` it runs in
    forward (for the value), then once per chunk in the reverse sweep (:meth:`accumulate_grads`: the
    gradient flowing into the RNN and its own parameters' and context's gradients, in one call). Anything
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

    def accumulate_grads(
        self, output: Tensor, start: int, d_value: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> Tensor | None:
        """Reverse sweep, once per chunk: the gradient of ``forward(output, start) · d_value`` with respect to
        ``output`` (a leaf requiring grad; None if the value does not depend on it), adding the gradient of
        each ``(tensor, accumulator)`` target (the head's parameters and context) into its accumulator. Runs
        under the autocast recorded in forward. Default: one ``autograd.grad`` call; override for a cheaper
        form (:class:`~lightning_revrnn.attention.AttentionHead` adds its generator's gradient block by block)."""
        grads = torch.autograd.grad(self(output, start), [output, *[t for t, _ in targets]], d_value, allow_unused=True)
        add_gradients(targets, grads[1:])
        return grads[0]


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
            add_gradients(targets, grads)


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
    #: Range checks of everything that feeds fixed-point rounding, read once at the end of the forward.
    guard: RangeGuard = field(default_factory=RangeGuard)
    extras: list[Tensor] = field(default_factory=list)
    head_slots: list[int] = field(default_factory=list)
    stem_slots: list[int] = field(default_factory=list)
    #: The exact final state (float64, one tensor per ``h``/``c`` per layer) after a forward.
    final_exact: list[Tensor] = field(default_factory=list)
    #: Padding: ``(T, B, 1)`` bool, False where example ``b`` skips step ``t`` (state and buffer untouched);
    #: None: every step of every example runs. Forward and the reverse sweep read the same tensor.
    keep: Tensor | None = None
    #: Stored units: the first ``stored_units`` units of the top layer's ``h1`` are stored every step instead
    #: of buffered, and they (``(T, B, S)``) are the window's outputs (see :func:`~lightning_revrnn.cells.store_units`).
    stored_units: int = 0
    #: ``mode="reverse"``: the stored units' values before the window (int) and after every step (the
    #: outputs), from which the reverse sweep restores them.
    stored_initial: Tensor | None = None
    stored_outputs: Tensor | None = None

    def __post_init__(self) -> None:
        self.extras, self.head_slots = [], []
        for t in [*trainable(self.head), *_context(self.head)]:
            self.head_slots.append(_slot(self.extras, t))
        self.stem_slots = [_slot(self.extras, t) for t in [*trainable(self.stem), *_context(self.stem)]]

    def start(self, batch: int, device: torch.device) -> None:
        """Fresh (empty) buffers for a new window."""
        self.buffers = [
            InformationBuffer((batch, c.half_size), device, c.max_forget_bits, self.retain) for c in self.cells
        ]

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

    def projection(self, layer: int, inputs: Tensor) -> Tensor:
        """A layer's input pre-activations for one chunk, ``(C, B, 2·rows)`` from its inputs ``(C, B, ·)``
        before dropout: one GEMM per chunk, the same in forward and reverse (chunks always start at
        multiples of :data:`CHUNK`, so the shapes agree too)."""
        return self.cells[layer].project_input(self.layer_input(layer, inputs))

    def stored(self, layer: int) -> int:
        """How many stored units ``layer``'s ``h1`` has (only the top layer's may)."""
        return self.stored_units if layer == len(self.cells) - 1 else 0

    def output_units(self, top: Tensor) -> Tensor:
        """The window's outputs from the top layer's ``(…, H)`` outputs: all, or the stored units."""
        return top[..., : self.stored_units] if self.stored_units else top

    def stored_before(self, t: int) -> Tensor | None:
        """Reverse sweep: the stored units' values (int) before step ``t``, or None without stored units."""
        if not self.stored_units:
            return None
        if t == 0:
            return self.stored_initial
        return to_fixed(cast(Tensor, self.stored_outputs)[t - 1])

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
            _raise_if_parameter_feeds_context(head, _context(head))


#: Graph nodes :func:`_raise_if_parameter_feeds_context` visits at most per context tensor.
CONTEXT_WALK_LIMIT = 10_000


def _raise_if_parameter_feeds_context(head: StepHead, context: list[Tensor]) -> None:
    """Raise if one of the head's own parameters is also an ancestor of one of its context tensors (a source
    embedding read by the head and by the encoder that produced the attention memory): the reverse sweep's
    per-chunk gradient call for the head's parameters would then run that other module's backward (its
    reverse sweep) once per chunk, which it refuses (one backward per forward)."""
    params = {id(p) for p in trainable(head)}
    for tensor in context:
        stack, seen = [tensor.grad_fn], set()
        while stack and len(seen) < CONTEXT_WALK_LIMIT:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if isinstance(variable, Tensor) and id(variable) in params:
                raise RuntimeError(
                    f"StepHead {type(head).__name__}: its parameter of shape {tuple(variable.shape)} also feeds one of "
                    f"its context() tensors (shape {tuple(tensor.shape)}), e.g. a source embedding read by the head "
                    "and by the encoder whose outputs are the attention memory. The reverse sweep forms the head's "
                    "parameter gradients once per chunk and would run the encoder's backward each time. Fix: read "
                    "that parameter in the head through a tensor made before the call (e.g. "
                    "`self.weight_view = embedding.weight[:]`) and list it in context() instead."
                )
            stack.extend(n for n, _ in node.next_functions)


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

    Chunk by chunk, layer by layer: a layer's input projection is one GEMM per chunk, then its steps;
    the reverse sweep recomputes each chunk in the same order and shapes. The outputs are the top layer's
    float outputs ``(T, B, H)`` (written into ``out`` when given, else one tensor with its graph), or the
    per-chunk head values when the window has a head. ``checksums[c, l]`` receives the fingerprint of
    layer ``l``'s state before chunk ``c``.
    """
    with cells_context(x.device):
        return _forward_window(window, x, state, state_f, out, checksums)


def _forward_window(
    window: Window, x: Tensor, state: list[list[Tensor]], state_f: list[list[Tensor]],
    out: Tensor | None, checksums: Tensor | None,
) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor | list[Tensor]]:
    weights = []
    for l, c in enumerate(window.cells):
        hidden = window.hidden_weights(l)
        window.guard.observe(f"layer {l}: hidden weights", hidden)
        weights.append(list(hidden.split(c.hidden_rows, 0)))
    results: list[Tensor] = []
    if window.stored_units:  # stored units hold float32 values exactly (to_fixed ∘ to_float keeps a float32 value)
        top = state[-1]
        top[0] = store_units(top[0], window.stored_units, to_float(top[0]))
        window.stored_initial = top[0][:, : window.stored_units]
    T = x.shape[0]
    for t0 in range(0, T, CHUNK):
        t1 = min(t0 + CHUNK, T)
        inp = window.chunk_input(x, t0, t1)
        for l, cell in enumerate(window.cells):
            if checksums is not None:
                checksums[t0 // CHUNK, l] = state_checksum(state[l])
            xp = window.projection(l, inp)
            window.guard.observe(f"layer {l}: input pre-activations", xp)
            outs = []
            for t in range(t0, t1):
                state[l], state_f[l] = cell.forward_step(
                    weights[l], xp[t - t0], state[l], state_f[l], window.buffers[l], window.step_keep(t),
                    window.stored(l),
                )
                outs.append(cell.output(state_f[l]))
            inp = torch.stack(outs)
        if window.head is not None:
            results.append(window.head_value(window.head, inp, t0))
        elif out is not None:
            out[t0:t1] = window.output_units(inp)
        else:
            results.append(window.output_units(inp))
    if window.head is None and out is None:
        return state, state_f, torch.cat(results)
    return state, state_f, (out if out is not None and window.head is None else results)


def finish_forward(window: Window, state: list[list[Tensor]], state_f: list[list[Tensor]]) -> list[Tensor]:
    """End a window's forward: the final states per layer and ``h``/``c`` as float32 (the correctly rounded
    value, carrying the float surrogate's gradient), flat in layer order; the exact float64 ones go to
    ``window.final_exact`` (for an exact carry into the next window). Checks every range the forward
    observed, with one host read."""
    rounded: list[Tensor] = []
    window.final_exact = []
    for l, (cell, ints, floats) in enumerate(zip(window.cells, state, state_f)):
        exact = [to_float(i, torch.float64) for i in ints]
        for k, h in enumerate(exact):
            window.guard.observe(f"layer {l}: final state half {k}", h)
        rounded += cell.join_state([straight_through(to_float(i), f) for i, f in zip(ints, floats)])
        window.final_exact += cell.join_state(exact)
    _end_of_window_read(window)
    return rounded


def _end_of_window_read(window: Window) -> None:
    """The forward's one host read: whether every range the guard observed is fine, and how many examples
    drained at each of every buffer's check points (the buffers then compact their drain records)."""
    flag = window.guard.in_range()
    counts = [b.drain_counts() for b in window.buffers]
    parts = ([] if flag is None else [flag.reshape(1).long()]) + counts
    host = torch.cat(parts).tolist() if parts else []
    if flag is not None:
        window.guard.check(bool(host.pop(0)))
    for buf, c in zip(window.buffers, counts):
        n = c.numel()
        buf.finish(host[:n])
        host = host[n:]


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
        h0 = [c.split_state(list(flat[l * n_state : (l + 1) * n_state])) for l, c in enumerate(cells)]
        state = [[to_fixed(h) for h in hs] for hs in h0]
        state_f = [[to_float(s) for s in st] for st in state]
        T, B = x.shape[0], x.shape[1]
        checksums = torch.zeros(-(-T // CHUNK), len(cells), dtype=torch.int64, device=x.device)
        units = window.stored_units or cells[-1].hidden_size
        out = None if window.head is not None else torch.empty(T, B, units, dtype=torch.float32, device=x.device)
        window.start(B, x.device)
        ctx.precision = matmul_precision_state()
        state, state_f, res = forward_window(window, x, state, state_f, out, checksums)
        finals = finish_forward(window, state, state_f)
        ctx.window, ctx.n_state = window, n_state
        ctx.n_final = [len(s) for s in state]
        masks = [m for m in [*window.input_masks, window.keep] if m is not None]
        if window.stored_units:  # the outputs are the stored units: the reverse sweep restores them from there
            window.stored_outputs = out
            masks += [cast(Tensor, window.stored_initial), cast(Tensor, out)]
        ctx.save_for_backward(
            x, checksums, *[h for s in state for h in s], *masks,
            *[t for b in window.buffers for t in b.tensors()],
        )
        # With a head the outputs are the per-chunk head values; without one they were written into ``out``.
        primary = torch.stack(cast(list[Tensor], res)).sum() if window.head is not None else cast(Tensor, out)
        return (primary, *finals)

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
        # Saved: x, the checksums (every layer's state before every chunk), the final int halves; masks and buffer
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


@dataclass
class LayerChunk:
    """One layer's share of a chunk in the reverse sweep: everything its backward reads.

    ``inputs``: the layer's input ``(C, B, ·)`` after dropout (the chunk's stem output for layer 0, the
    layer below's reconstructed outputs above); ``records``: per step (in time order) the two groups'
    records from :meth:`~lightning_revrnn.cells.ReversibleCell.reverse_step`. A ``C × B × H`` working set
    per layer, never ``T × B × H``.
    """

    inputs: Tensor
    records: list[list[tuple[Tensor, ...]]]


@dataclass
class Gradients:
    """The reverse sweep's accumulators: one per parameter (and per extra tensor), plus the gradient of
    every layer's current state (halves), carried from chunk to chunk."""

    weight_ih: list[Tensor]
    bias: list[Tensor]
    weight_hh: list[Tensor]
    extras: list[Tensor]
    state: list[list[Tensor]]

    @classmethod
    def zeros(cls, window: Window, hidden: list[Tensor], state: list[list[Tensor]]) -> Gradients:
        cells = window.cells
        return cls(
            weight_ih=[torch.zeros_like(c.weight_ih) for c in cells],
            bias=[torch.zeros_like(c.bias) for c in cells],
            weight_hh=[torch.zeros_like(w) for w in hidden],
            extras=[torch.zeros_like(e) for e in window.extras],
            state=state,
        )


def _reverse(
    ctx: Any, window: Window, x: Tensor, checksums: Tensor, state: list[list[Tensor]], grad_primary: Tensor,
    grad_final: tuple[Tensor, ...], n_state: int,
) -> tuple[Tensor | None, ...]:
    """The reverse sweep: chunk by chunk from the last, reconstruct every layer's states exactly
    (:func:`reconstruct_chunk`), then backpropagate through them like ordinary BPTT (:func:`backprop_chunk`)."""
    cells = window.cells
    T, L = x.shape[0], len(cells)
    state = [list(s) for s in state]
    # Hidden weights: the same (DropConnect-masked) tensors as in forward; their gradient goes through the
    # mask once at the end.
    hidden = [window.hidden_weights(l) for l in range(L)]
    weights = [[w.detach() for w in hw.split(c.hidden_rows, 0)] for c, hw in zip(cells, hidden)]
    d_state = []
    for l, c in enumerate(cells):
        gs = [torch.zeros(x.shape[1], c.hidden_size, device=x.device) if g is None else g.float() for g in
              grad_final[l * n_state : (l + 1) * n_state]]
        d_state.append(c.split_state(gs))
    grads = Gradients.zeros(window, hidden, d_state)
    dx = torch.zeros_like(x) if ctx.needs_input_grad[2] else None
    diverged = torch.zeros_like(checksums, dtype=torch.bool)
    for t0 in reversed(range(0, T, CHUNK)):
        t1 = min(t0 + CHUNK, T)
        x_chunk = x[t0:t1]
        if dx is not None and window.stem is not None:  # a leaf of the chunk's recomputed stem graph
            x_chunk = x_chunk.detach().requires_grad_()
        x0 = window.chunk_input(x_chunk, 0, t1 - t0)
        layers, top = reconstruct_chunk(window, weights, x0.detach(), state, t0)
        for l in range(L):
            diverged[t0 // CHUNK, l] = state_checksum(state[l]) != checksums[t0 // CHUNK, l]
        d_top = head_gradient(window, top, t0, grad_primary, grads)
        d_x0 = backprop_chunk(window, weights, layers, d_top, t0, grads)
        if window.stem is None:
            if dx is not None:
                dx[t0:t1] = d_x0
        else:
            targets = [(window.extras[i], grads.extras[i]) for i in window.stem_slots]
            targets += [(x_chunk, dx[t0:t1])] if dx is not None else []
            window.stem.accumulate_grads(x_chunk, x0, d_x0, targets)
    _check_reconstruction(window, diverged)
    params_grads: list[Tensor | None] = []
    for l, c in enumerate(cells):
        d_hidden = torch.autograd.grad(hidden[l], c.weight_hh, grads.weight_hh[l])[0]
        params_grads += [grads.weight_ih[l], grads.bias[l], d_hidden]
    d_initial: list[Tensor | None] = []
    for l, c in enumerate(cells):
        d_initial += c.join_state(grads.state[l])
    return (None, None, dx, *d_initial, *params_grads, *grads.extras)


def reconstruct_chunk(
    window: Window, weights: list[list[Tensor]], x0: Tensor, state: list[list[Tensor]], t0: int
) -> tuple[list[LayerChunk], Tensor]:
    """Walk one chunk backwards with exact fixed-point ops, layer by layer from the bottom (a layer's
    inputs are the outputs of the one below, reconstructed first). ``state`` holds each layer's int halves
    after the chunk and is left holding them before it. Returns each layer's :class:`LayerChunk` and the
    top layer's outputs ``(C, B, H)``."""
    layers: list[LayerChunk] = []
    inp = x0
    with torch.no_grad():
        for l, cell in enumerate(window.cells):
            inputs = window.layer_input(l, inp)
            reverse_steps = _reverse_steps_fused if cell.uses_fused() else _reverse_steps
            records, inp = reverse_steps(window, l, weights[l], cell.project_input(inputs), state, t0)
            layers.append(LayerChunk(inputs, records))
    return layers, inp


def _reverse_steps(
    window: Window, l: int, w: list[Tensor], xp: Tensor, state: list[list[Tensor]], t0: int
) -> tuple[list[list[tuple[Tensor, ...]]], Tensor]:
    """Layer ``l``'s steps of one chunk in reverse (the eager reference): each step's records, and the
    layer's outputs ``(C, B, H)`` (each step's output converted from its int halves)."""
    cell = window.cells[l]
    C = xp.shape[0]
    records: list[list[tuple[Tensor, ...]]] = [[] for _ in range(C)]
    outs = xp.new_empty(C, xp.shape[1], cell.hidden_size)
    for i in reversed(range(C)):
        outs[i] = cell.output([to_float(h) for h in state[l][:2]])
        state[l], records[i] = cell.reverse_step(
            w, xp[i], state[l], window.buffers[l], window.step_keep(t0 + i), _stored_old(window, l, t0 + i)
        )
    return records, outs


def _reverse_steps_fused(
    window: Window, l: int, w: list[Tensor], xp: Tensor, state: list[list[Tensor]], t0: int
) -> tuple[list[list[tuple[Tensor, ...]]], Tensor]:
    """:func:`_reverse_steps` on the fused path: the state's float halves are carried from step to step (the
    integer stages return them and the records hold them, :meth:`~ReversibleCell.floats_before`), so only
    the chunk's last state is converted, and the outputs are stacked once per chunk."""
    cell = window.cells[l]
    C = xp.shape[0]
    records: list[list[tuple[Tensor, ...]]] = [[] for _ in range(C)]
    floats = [to_float(h) for h in state[l]]
    outputs: list[list[Tensor]] = []  # the h halves after each step, last step first
    for i in reversed(range(C)):
        outputs.append(floats[:2])
        state[l], records[i] = cell.reverse_step(
            w, xp[i], state[l], window.buffers[l], window.step_keep(t0 + i), _stored_old(window, l, t0 + i), floats
        )
        floats = cell.floats_before(records[i])
    return records, torch.cat([torch.stack(half[::-1]) for half in zip(*outputs)], -1)


def _stored_old(window: Window, l: int, t: int) -> Tensor | None:
    """The stored units' values (int) before step ``t`` when layer ``l`` has any, else None."""
    return window.stored_before(t) if window.stored(l) else None


def head_gradient(window: Window, top: Tensor, t0: int, grad_primary: Tensor, grads: Gradients) -> Tensor:
    """The loss gradient of the top layer's outputs over one chunk ``(C, B, H)``: from the head, run once
    on the chunk (its parameters' and context's gradients accumulate in the same call), or the incoming
    gradient of the outputs without a head."""
    head = window.head
    if head is None:
        return grad_primary[t0 : t0 + top.shape[0]]
    pairs = [(window.extras[i], grads.extras[i]) for i in window.head_slots]
    with window.autocast.enter():
        d_out = head.accumulate_grads(top.detach().requires_grad_(), t0, grad_primary, pairs)
    return torch.zeros_like(top) if d_out is None else d_out


def backprop_chunk(
    window: Window, weights: list[list[Tensor]], layers: list[LayerChunk], d_top: Tensor, t0: int,
    grads: Gradients,
) -> Tensor:
    """BPTT over one reconstructed chunk, top layer first: per step the cells' written-out backward (and
    its two small dh GEMMs), per chunk one GEMM each for the input gradient and the weight gradients.
    Returns the gradient of the first layer's input (before its dropout) ``(C, B, E)``."""
    with torch.no_grad():  # gradients written out: nothing here may record a graph
        return _backprop_chunk(window, weights, layers, d_top.detach(), t0, grads)


def _backprop_chunk(
    window: Window, weights: list[list[Tensor]], layers: list[LayerChunk], d_top: Tensor, t0: int,
    grads: Gradients,
) -> Tensor:
    d_out = d_top
    for l in reversed(range(len(window.cells))):
        cell, chunk = window.cells[l], layers[l]
        backprop_steps = _backprop_steps_fused if cell.uses_fused() else _backprop_steps
        grads.state[l], d_xp = backprop_steps(window, l, weights[l], chunk, d_out, grads.state[l], t0)
        _hidden_weight_grads(cell, grads.weight_hh[l], chunk.records, d_xp)
        _linear_param_grads(grads.weight_ih[l], grads.bias[l], d_xp, chunk.inputs)
        d_out = masked(d_xp @ cell.weight_ih, window.input_masks[l])
    return d_out


def _backprop_steps(
    window: Window, l: int, w: list[Tensor], chunk: LayerChunk, d_out: Tensor, d_state: list[Tensor], t0: int
) -> tuple[list[Tensor], Tensor]:
    """Layer ``l``'s steps of one chunk backwards (the eager reference), from the gradient of its outputs
    ``d_out`` (``(C, B, H)``, or ``(C, B, S)`` for stored units) and of its state after the chunk: the
    gradient of its state before the chunk and of its input pre-activations ``(C, B, 2·rows)``."""
    cell = window.cells[l]
    d_xp = d_out.new_empty(len(chunk.records), d_out.shape[1], 2 * cell.hidden_rows)
    for i in reversed(range(len(chunk.records))):
        d_state = add_output_gradient(d_state, d_out[i])  # (B, H), or (B, S) for the stored units of h1
        d_state, d_xp[i] = cell.backward_step(w, chunk.records[i], d_state, window.step_keep(t0 + i))
    return d_state, d_xp


def _backprop_steps_fused(
    window: Window, l: int, w: list[Tensor], chunk: LayerChunk, d_out: Tensor, d_state: list[Tensor], t0: int
) -> tuple[list[Tensor], Tensor]:
    """:func:`_backprop_steps` on the fused path: each step's backward, output gradient included, is one
    compiled stage (:meth:`~ReversibleCell.fused_backward_step`); the pre-activation gradients are stacked
    once per chunk."""
    cell = window.cells[l]
    d_pre: list[Tensor] = []  # last step first
    for i in reversed(range(len(chunk.records))):
        d_state, d_step = cell.fused_backward_step(w, chunk.records[i], d_state, d_out[i], window.step_keep(t0 + i))
        d_pre.append(d_step)
    return d_state, torch.stack(d_pre[::-1])


def _hidden_weight_grads(
    cell: ReversibleCell, d_weight: Tensor, records: list[list[tuple[Tensor, ...]]], d_xp: Tensor
) -> None:
    """Accumulate a layer's hidden-weight gradient over a chunk: one GEMM per group and weight slice."""
    rows = cell.hidden_rows
    for g in (0, 1):
        for k, (start, stop, _) in enumerate(cell.hidden_inputs(records[0][g])):
            inputs = torch.stack([cell.hidden_inputs(r[g])[k][2] for r in records]).flatten(0, 1)
            d_pre = d_xp[..., g * rows + start : g * rows + stop].flatten(0, 1)
            d_weight[g * rows + start : g * rows + stop].addmm_(d_pre.t(), inputs)


def _linear_param_grads(d_weight: Tensor, d_bias: Tensor, d_out: Tensor, inputs: Tensor) -> None:
    """Accumulate ``y = x Wᵀ + b`` parameter gradients over a chunk ``(C, B, ·)`` in one GEMM."""
    d_out, inputs = d_out.flatten(0, 1), inputs.flatten(0, 1)
    d_weight.addmm_(d_out.t(), inputs)
    d_bias.add_(d_out.sum(0))


def _check_reconstruction(window: Window, diverged: Tensor) -> None:
    """One host read: every chunk's reconstructed states matched forward's checksums and every buffer is
    back to empty; else a :class:`ReconstructionError` naming the layer and steps."""
    words = [b.word.any() for b in window.buffers]
    undone = all(not b.planes and not b.drained_before and b.multiplications == 0 for b in window.buffers)
    if undone and not bool(torch.stack([diverged.any(), *words]).any()):
        return
    bad = diverged.nonzero().tolist()
    if bad:
        chunk, l = max(bad)  # the reverse sweep meets the latest chunk first
        raise ReconstructionError(
            f"Reverse sweep diverged: layer {l}, reconstructing steps {chunk * CHUNK}..{(chunk + 1) * CHUNK - 1} "
            f"did not give the state forward had before step {chunk * CHUNK} bit for bit ({len(bad)} "
            "(chunk, layer) states differ). The saved buffer was modified, or forward and backward ran with "
            "different numerics (autocast, TF32, threads, device)."
        )
    for l, buf in enumerate(window.buffers):
        if not buf.is_empty():
            raise ReconstructionError(f"Reverse sweep of layer {l} reached the initial state with a non-empty buffer.")
