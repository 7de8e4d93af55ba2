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
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
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
    """

    @abstractmethod
    def forward(self, output: Tensor, start: int) -> Tensor:
        """The scalar sum of the head over steps ``start .. start + len(output) - 1``."""


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
    """

    @abstractmethod
    def forward(self, inputs: Tensor) -> Tensor:
        """The first layer's input ``(T', B, input_size)`` for ``inputs`` of leading dims ``(T', B)``."""


@dataclass
class Window:
    """Everything one window's forward and reverse share (host objects, not differentiated)."""

    cells: list[ReversibleCell]
    input_masks: list[Tensor | None]
    hidden_masks: list[SeededMask | None]
    retain: bool
    head: StepHead | None = None
    stem: StepStem | None = None
    buffers: list[InformationBuffer] = field(default_factory=list)
    guards: list[RangeGuard] = field(default_factory=list)

    def start(self, batch: int, device: torch.device) -> None:
        """Fresh (empty) buffers and guards for a new window."""
        self.buffers = [
            InformationBuffer((batch, c.half), device, c.max_forget_bits, self.retain) for c in self.cells
        ]
        self.guards = [RangeGuard() for _ in self.cells]

    def chunk_input(self, inputs: Tensor, t0: int, t1: int) -> Tensor:
        """The first layer's input for steps ``t0..t1-1`` (through the stem, if any), before input dropout."""
        return inputs[t0:t1] if self.stem is None else self.stem(inputs[t0:t1])

    def first_projection(self, inputs: Tensor, t0: int, t1: int) -> Tensor:
        """The first layer's input pre-activations for one chunk ``(t1-t0, B, rows)``: one GEMM over the
        chunk, computed identically in forward and reverse (chunks always start at multiples of CHUNK)."""
        return self.cells[0].project_input(self.layer_input(0, self.chunk_input(inputs, t0, t1)))

    def hidden_weights(self, layer: int) -> Tensor:
        """The layer's hidden-to-hidden weights for this window (DropConnect mask redrawn from its seed)."""
        cell, mask = self.cells[layer], self.hidden_masks[layer]
        return cell.weight_hh if mask is None else cell.weight_hh * mask.materialize()

    def layer_input(self, layer: int, x: Tensor) -> Tensor:
        """Apply the layer's locked dropout mask (inputs for layer 0, between layers above)."""
        mask = self.input_masks[layer]
        return x if mask is None else x * mask


def split_state(cell: ReversibleCell, full: list[Tensor]) -> list[Tensor]:
    """``[h]`` or ``[h, c]`` of shape (B, H) to the cell's list of halves."""
    halves = [cell.split_output(s) for s in full]
    return [halves[j][i] for j in range(len(full)) for i in (0, 1)]


def join_state(full_count: int, halves: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`split_state`."""
    return [torch.cat(halves[2 * j : 2 * j + 2], 1) for j in range(full_count)]


_MIX: dict[tuple[torch.Size, torch.device], Tensor] = {}


def state_checksum(state: list[Tensor]) -> Tensor:
    """An int64 fingerprint of a state: a position-weighted sum of all halves, exact modulo 2^64."""
    flat = torch.stack(state)
    key = (flat.shape, flat.device)
    if key not in _MIX:
        _MIX[key] = torch.arange(1, 2 * flat.numel() + 1, 2, device=flat.device, dtype=torch.int64).view(flat.shape)
    return (flat * _MIX[key]).sum()


@contextlib.contextmanager
def exact_float_context(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast off and one fixed float32 matmul precision, so forward and reverse round alike."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


def forward_window(
    window: Window, x: Tensor, state: list[list[Tensor]], state_f: list[list[Tensor]],
    out: Tensor | None = None, checksums: Tensor | None = None,
) -> tuple[list[list[Tensor]], list[list[Tensor]], Tensor | list[Tensor]]:
    """Run the window forward. Returns the final (int, float) states and the outputs.

    The outputs are the top layer's float outputs per step (written into ``out`` when given, else a list
    of tensors that keep their graph), or the per-step head values when the window has a head.
    ``checksums[t + 1, l]`` receives the fingerprint of layer ``l``'s state after step ``t``.
    """
    weights = [list(window.hidden_weights(l).split(c.hidden_rows, 0)) for l, c in enumerate(window.cells)]
    results: list[Tensor] = []
    inp: Tensor
    T = x.shape[0]
    for t in range(T):
        if t % CHUNK == 0:
            t0, t1 = t, min(t + CHUNK, T)
            xp0 = window.first_projection(x, t0, t1)
            chunk_out: list[Tensor] = []
        for l, cell in enumerate(window.cells):
            xp = xp0[t % CHUNK] if l == 0 else cell.project_input(window.layer_input(l, inp))
            state[l], state_f[l] = cell.forward_step(
                weights[l], xp, state[l], state_f[l], window.buffers[l], window.guards[l]
            )
            if checksums is not None:
                checksums[t + 1, l] = state_checksum(state[l])
            inp = cell.output(state_f[l])
        if window.head is not None:
            chunk_out.append(inp)
            if t == t1 - 1:
                results.append(window.head(torch.stack(chunk_out), t0))
        elif out is not None:
            out[t] = inp
        else:
            results.append(inp)
    for l, guard in enumerate(window.guards):
        guard.check(f"layer {l}")
    return state, state_f, (out if out is not None and window.head is None else results)


def exact_final_state(cell: ReversibleCell, ints: list[Tensor], floats: list[Tensor]) -> list[Tensor]:
    """Final state as float64 (exact), carrying the float surrogate's gradient where it has one."""
    halves = [straight_through(to_float(i, torch.float64), f.double()) for i, f in zip(ints, floats)]
    for k, h in enumerate(ints):
        check_range(to_float(h, torch.float64), f"final state half {k}")
    return join_state(cell.halves_per_group, halves)


class ReverseSweep(torch.autograd.Function):
    """Training by reversal. ``apply(window, n_state, x, *states, *cell_params, *head_params, *stem_params)``.

    ``state_tensors`` are the initial states (float, ``(B, H)`` each; per layer ``h`` or ``h, c``),
    ``cell_params`` the cells' parameters in :meth:`_layer_params` order. Returns the outputs
    (``(T, B, H_top)``) or, with a head, the summed head value, followed by the exact final states.
    """

    @staticmethod
    def forward(ctx: Any, window: Window, n_state: int, x: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
        cells = window.cells
        h0 = [split_state(c, list(flat[l * n_state : (l + 1) * n_state])) for l, c in enumerate(cells)]
        state = [[to_fixed(h) for h in hs] for hs in h0]
        state_f = [[to_float(s) for s in st] for st in state]
        T, B = x.shape[0], x.shape[1]
        precision = torch.get_float32_matmul_precision()
        checksums = torch.zeros(T + 1, len(cells), dtype=torch.int64, device=x.device)
        for l, st in enumerate(state):
            checksums[0, l] = state_checksum(st)
        out = None if window.head is not None else torch.empty(T, B, cells[-1].hidden_size, dtype=torch.float32, device=x.device)
        window.start(B, x.device)
        with exact_float_context(x.device, precision):
            state, state_f, res = forward_window(window, x, state, state_f, out, checksums)
        finals = [exact_final_state(c, s, f) for c, s, f in zip(cells, state, state_f)]
        ctx.window, ctx.n_state, ctx.precision = window, n_state, precision
        ctx.n_final = [len(s) for s in state]
        masks = [m for m in window.input_masks if m is not None]
        ctx.save_for_backward(
            x, checksums, *[h for s in state for h in s], *masks,
            *[t for b in window.buffers for t in b.tensors()],
        )
        # With a head the outputs are the per-step head values; without one they were written into ``out``.
        primary = torch.stack(cast(list[Tensor], res)).sum() if window.head is not None else cast(Tensor, out)
        return (primary, *[f for fs in finals for f in fs])

    @staticmethod
    def backward(ctx: Any, grad_primary: Tensor, *grad_final: Tensor) -> tuple[Tensor | None, ...]:
        window: Window = ctx.window
        cells, n_state = window.cells, ctx.n_state
        if getattr(ctx, "swept", False) and any(c.forgets for c in cells):
            raise RuntimeError(
                "A reversible RNN in mode='reverse' supports one backward per forward: the reverse sweep "
                "consumes the information buffer. For a second backward through the same graph "
                "(retain_graph=True, double backward), use mode='store'."
            )
        ctx.swept = True
        # Saved: x, the checksums (initial state and every step), the final int halves; masks and buffer
        # tensors follow only so that saved-tensor hooks see everything the sweep keeps alive (the window
        # holds the same objects).
        saved = ctx.saved_tensors
        x, checksums = saved[0], saved[1]
        pos, state = 2, []
        for n in ctx.n_final:
            state.append(list(saved[pos : pos + n]))
            pos += n
        with torch.enable_grad(), exact_float_context(x.device, ctx.precision):
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
    head_params, stem_params = trainable(head), trainable(window.stem)
    head_frozen = None if head is None else {n: p.detach() for n, p in head.named_parameters()}
    d_head = [torch.zeros_like(p) for p in head_params]
    d_stem = [torch.zeros_like(p) for p in stem_params]
    grads: list[list[Tensor]] = []
    for l, c in enumerate(cells):
        gs = [torch.zeros(x.shape[1], c.hidden_size, device=x.device) if g is None else g.float() for g in
              grad_final[l * n_state : (l + 1) * n_state]]  # float64 (h_n's dtype) to the sweep's float32
        grads.append(split_state(c, gs))
    dx = torch.zeros_like(x) if ctx.needs_input_grad[2] and window.stem is None else None
    diverged = torch.zeros(T, L, dtype=torch.bool, device=x.device)
    for t in range(T - 1, -1, -1):
        if t == T - 1 or t % CHUNK == CHUNK - 1:  # entering a chunk from its end
            t0, t1 = t - t % CHUNK, t + 1
            x0 = window.chunk_input(x, t0, t1)
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
            value = functional_call(head, cast(dict[str, Tensor], head_frozen), (out_leaf[None], t))
            d_out = torch.autograd.grad(value, out_leaf, grad_primary, allow_unused=True)[0]
            d_out = torch.zeros_like(out_leaf) if d_out is None else d_out
            head_inputs.append(out_leaf.detach())
        else:
            d_out = grad_primary[t]
        for i, g in enumerate(top.split_output(d_out)):
            grads[-1][i] = grads[-1][i] + g
        for l in range(L - 1, -1, -1):
            cell = cells[l]
            if l == 0:
                xp = xp0[t - t0]
            else:
                with torch.no_grad():
                    xp = cell.project_input(inputs[l])
            state[l], grads[l], d_xp, step_products = cell.reverse_step(
                w_groups[l], xp, state[l], grads[l], window.buffers[l]
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
            if head_params:
                value = cast(StepHead, head)(torch.stack(head_inputs[::-1]), t0)  # head_params: a head
                _accumulate(d_head, torch.autograd.grad(value, head_params, grad_primary, allow_unused=True))
            if dx is not None:
                dx[t0:t1] = d_x0
            elif stem_params:
                _accumulate(d_stem, torch.autograd.grad(x0, stem_params, d_x0, allow_unused=True))
    _check_reconstruction(window, diverged)
    params_grads: list[Tensor | None] = []
    for l, c in enumerate(cells):
        d_hidden = torch.autograd.grad(hidden_full[l], c.weight_hh, torch.cat(d_w[l], 0))[0]
        params_grads += [d_ih[l], d_bias[l], d_hidden]
    d_state: list[Tensor | None] = []
    for l, c in enumerate(cells):
        d_state += join_state(c.halves_per_group, grads[l])
    return (None, None, dx, *d_state, *params_grads, *d_head, *d_stem)


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
