"""Training by reversal: :class:`ReverseSweep`, the ``mode="reverse"`` autograd Function.

Its forward runs the window (:func:`~lightning_revrnn.core.forward.run_forward`) and keeps only the buffers,
the final state, the inputs and the masks. Its single backward walks the window backwards chunk by chunk
through all layers: it reconstructs each state from the next with exact fixed-point arithmetic
(:func:`reconstruct_chunk`), recomputes the head on the chunk, and backpropagates through the reconstructed
chunk like ordinary BPTT (:func:`backprop_chunk`), returning the gradients of the input, the initial state and
every parameter. It checks each reconstructed state against a checksum taken in forward and raises
:class:`~lightning_revrnn.core.errors.ReconstructionError` naming the first layer and steps that diverged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import ReversibleCell
from lightning_revrnn.core.errors import ReconstructionError
from lightning_revrnn.core.fixed_point import to_fixed, to_float
from lightning_revrnn.core.forward import run_forward
from lightning_revrnn.core.gates import masked
from lightning_revrnn.core.numerics import cells_context, matmul_precision_state
from lightning_revrnn.core.protocol import chunk_steps
from lightning_revrnn.core.records import Record
from lightning_revrnn.core.window import WindowPlan, state_checksum

SECOND_BACKWARD = (
    "A reversible RNN in mode='reverse' supports one backward per forward: the reverse sweep consumes the "
    "information buffer (and frees what it saved). The usual cause is a final state carried into the next "
    "window without detaching it, so the next backward runs through this window again. Fix: carry "
    "hx = h_n.detach() (truncated BPTT), or use mode='store' for a second backward through the same graph "
    "(retain_graph=True, double backward)."
)


@dataclass(frozen=True)
class WindowRecord:
    """What the reverse sweep of one window reads besides its saved tensors: the plan and what the forward
    left for it. ``buffers`` are consumed by the sweep (empty again after it); ``final_exact``: the final
    state in float64; ``stored_initial`` / ``stored_outputs``: the stored units before the window (int) and
    after every step (the outputs, float32), from which the sweep restores them (None without)."""

    plan: WindowPlan
    buffers: list[InformationBuffer]
    final_exact: list[Tensor]
    stored_initial: Tensor | None
    stored_outputs: Tensor | None

    def stored_before(self, t: int) -> Tensor | None:
        """The stored units' values (int) before step ``t``, or None without stored units."""
        if self.stored_initial is None:
            return None
        if t == 0:
            return self.stored_initial
        assert self.stored_outputs is not None
        return to_fixed(self.stored_outputs[t - 1])


class ReverseSweep(torch.autograd.Function):
    """Training by reversal. ``apply(plan, n_state, x, *states, *cell_params, *plan.extras)``.

    ``states`` are the initial states (float, ``(B, H)`` each; per layer ``h`` or ``h, c``), ``cell_params``
    each cell's ``weight_ih, bias, weight_hh``, ``extras`` the head's and stem's parameters and context (see
    :class:`~lightning_revrnn.core.window.WindowPlan`). Returns the outputs ``(T, B, units)`` or, with a head,
    the summed head value, then the final states (float32), then the :class:`WindowRecord` (not a tensor:
    the exact final state and the buffers, for the caller's carry and accounting).
    """

    @staticmethod
    def forward(ctx: Any, plan: WindowPlan, n_state: int, x: Tensor, *flat: Tensor) -> tuple[Any, ...]:
        cells = plan.cells
        initial = list(flat[: n_state * len(cells)])
        h0 = [c.split_state(initial[l * n_state : (l + 1) * n_state]) for l, c in enumerate(cells)]
        state = [[to_fixed(h) for h in hs] for hs in h0]
        state_f = [[to_float(s) for s in st] for st in state]
        T, B = x.shape[0], x.shape[1]
        checksums = torch.zeros(-(-T // chunk_steps(T)), len(cells), dtype=torch.int64, device=x.device)
        units = plan.stored_units or cells[-1].hidden_size
        out = None if plan.head is not None else torch.empty(T, B, units, dtype=torch.float32, device=x.device)
        ctx.precision = matmul_precision_state()
        result = run_forward(plan, x, state, state_f, initial, out, checksums)
        stored_outputs = out if plan.stored_units else None
        record = WindowRecord(plan, result.buffers, result.final_exact, result.stored_initial, stored_outputs)
        ctx.record, ctx.n_state = record, n_state
        ctx.n_final = [len(s) for s in result.state]
        masks = [m for m in [*plan.input_masks, plan.keep, result.stored_initial, stored_outputs] if m is not None]
        ctx.save_for_backward(
            x,
            checksums,
            *[h for s in result.state for h in s],
            *masks,
            *[t for b in result.buffers for t in b.tensors()],
        )
        return (result.primary, *result.finals, record)

    @staticmethod
    def backward(ctx: Any, grad_primary: Tensor, *grad_rest: Any) -> tuple[Tensor | None, ...]:
        record: WindowRecord = ctx.record
        if getattr(ctx, "swept", False) and any(c.forgets for c in record.plan.cells):
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
        # tensors follow only so that saved-tensor hooks see everything the sweep keeps alive (the record holds
        # the same objects).
        x, checksums = saved[0], saved[1]
        pos, state = 2, []
        for n in ctx.n_final:
            state.append(list(saved[pos : pos + n]))
            pos += n
        grad_final = grad_rest[:-1]  # the last output is the record (no gradient)
        with torch.enable_grad(), cells_context(x.device):
            needs_dx = bool(ctx.needs_input_grad[2])
            return _reverse(record, x, checksums, state, grad_primary, grad_final, ctx.n_state, needs_dx)


@dataclass
class LayerChunk:
    """One layer's share of a chunk in the reverse sweep: everything its backward reads.

    ``inputs``: the layer's input ``(C, B, ·)`` after dropout (the chunk's stem output for layer 0, the
    layer below's reconstructed outputs above); ``records``: per step (in time order) the two groups'
    records. A ``C × B × H`` working set per layer, never ``T × B × H``.
    """

    inputs: Tensor
    records: list[list[Record]]


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
    def zeros(cls, plan: WindowPlan, hidden: list[Tensor], state: list[list[Tensor]], inputs: Tensor) -> Gradients:
        """Zeroed accumulators; the head's tensors get the one the head asks for, then the stem's the one the stem
        asks for (``context_accumulator``; a tensor both read gets the head's)."""
        cells = plan.cells

        def accumulator(i: int, tensor: Tensor) -> Tensor:
            if plan.head is not None and i in plan.head_slots:
                return plan.head.context_accumulator(tensor)
            if plan.stem is not None and i in plan.stem_slots:
                return plan.stem.context_accumulator(tensor, inputs)
            return torch.zeros_like(tensor)

        extras = [accumulator(i, e) for i, e in enumerate(plan.extras)]
        return cls(
            weight_ih=[torch.zeros_like(c.weight_ih) for c in cells],
            bias=[torch.zeros_like(c.bias) for c in cells],
            weight_hh=[torch.zeros_like(w) for w in hidden],
            extras=extras,
            state=state,
        )

    def stem_targets(self, plan: WindowPlan, t0: int, t1: int) -> list[tuple[Tensor, Tensor]]:
        """The stem's ``(tensor, accumulator)`` pairs for the chunk ``t0:t1``: a per-step accumulator sliced."""
        pairs = []
        for i in plan.stem_slots:
            tensor, acc = plan.extras[i], self.extras[i]
            pairs.append((tensor, acc if acc.shape == tensor.shape else acc[t0:t1]))
        return pairs

    def extras_gradients(self, plan: WindowPlan, inputs: Tensor) -> list[Tensor]:
        """The extra tensors' gradients from their accumulators: each turned back by whoever chose it in
        :meth:`zeros` (the head before the stem)."""
        grads = []
        for i, (tensor, acc) in enumerate(zip(plan.extras, self.extras)):
            if plan.head is not None and i in plan.head_slots:
                acc = plan.head.context_gradient(tensor, acc)
            elif plan.stem is not None and i in plan.stem_slots:
                acc = plan.stem.context_gradient(tensor, acc, inputs)
            grads.append(acc)
        return grads


def _reverse(
    record: WindowRecord,
    x: Tensor,
    checksums: Tensor,
    state: list[list[Tensor]],
    grad_primary: Tensor,
    grad_final: tuple[Tensor | None, ...],
    n_state: int,
    needs_dx: bool,
) -> tuple[Tensor | None, ...]:
    """The reverse sweep: chunk by chunk from the last, reconstruct every layer's states exactly
    (:func:`reconstruct_chunk`), then backpropagate through them like ordinary BPTT (:func:`backprop_chunk`)."""
    plan = record.plan
    cells = plan.cells
    T, L = x.shape[0], len(cells)
    state = [list(s) for s in state]
    # Hidden weights: the same (DropConnect-masked) tensors as in forward, without a graph (autograd would keep
    # the mask alive through the sweep); their gradient goes through the mask once at the end (_hidden_grad).
    with torch.no_grad():
        hidden = [plan.hidden_weights(l) for l in range(L)]
    weights = [list(hw.split(c.hidden_rows, 0)) for c, hw in zip(cells, hidden)]
    d_state = []
    for l, c in enumerate(cells):
        gs = [
            torch.zeros(x.shape[1], c.hidden_size, device=x.device) if g is None else g.float()
            for g in grad_final[l * n_state : (l + 1) * n_state]
        ]
        d_state.append(c.split_state(gs))
    grads = Gradients.zeros(plan, hidden, d_state, x)
    dx = torch.zeros_like(x) if needs_dx else None
    diverged = torch.zeros_like(checksums, dtype=torch.bool)
    chunk = chunk_steps(T)
    for t0 in reversed(range(0, T, chunk)):
        t1 = min(t0 + chunk, T)
        x_chunk = x[t0:t1]
        if dx is not None and plan.stem is not None:  # a leaf of the chunk's recomputed stem graph
            x_chunk = x_chunk.detach().requires_grad_()
        x0 = plan.chunk_input(x_chunk, 0, t1 - t0)
        layers, top = reconstruct_chunk(record, weights, x0.detach(), state, t0)
        for l in range(L):
            diverged[t0 // chunk, l] = state_checksum(state[l]) != checksums[t0 // chunk, l]
        d_top = head_gradient(plan, top, t0, grad_primary, grads)
        d_x0 = backprop_chunk(plan, weights, layers, d_top, t0, grads)
        if plan.stem is None:
            if dx is not None:
                dx[t0:t1] = d_x0
        else:
            targets = grads.stem_targets(plan, t0, t1)
            targets += [(x_chunk, dx[t0:t1])] if dx is not None else []
            plan.stem.accumulate_grads(x_chunk, x0, d_x0, targets)
        # this chunk's records and activations go now, not when the next chunk's are already built
        del layers, top, d_top, d_x0, x0, x_chunk
    _check_reconstruction(record.buffers, diverged, T)
    params_grads: list[Tensor | None] = []
    del hidden, weights
    for l in range(L):
        params_grads += [grads.weight_ih[l], grads.bias[l], _hidden_grad(plan, l, grads.weight_hh[l])]
    d_initial: list[Tensor | None] = []
    for l, c in enumerate(cells):
        d_initial += c.join_state(grads.state[l])
    return (None, None, dx, *d_initial, *params_grads, *grads.extras_gradients(plan, x))


def _hidden_grad(plan: WindowPlan, layer: int, d_masked: Tensor) -> Tensor:
    """The gradient of ``weight_hh`` from that of the masked weights ``weight_hh * mask``: times the mask (redrawn
    from its seed after the sweep, when the chunk's records are gone), in place, so the accumulator becomes the
    parameter's ``.grad``."""
    mask = plan.hidden_masks[layer]
    return d_masked if mask is None else d_masked.mul_(mask.materialize())


def reconstruct_chunk(
    record: WindowRecord, weights: list[list[Tensor]], x0: Tensor, state: list[list[Tensor]], t0: int
) -> tuple[list[LayerChunk], Tensor]:
    """Walk one chunk backwards with exact fixed-point ops, layer by layer from the bottom (a layer's
    inputs are the outputs of the one below, reconstructed first). ``state`` holds each layer's int halves
    after the chunk and is left holding them before it. Returns each layer's :class:`LayerChunk` and the
    top layer's outputs ``(C, B, H)``."""
    plan = record.plan
    layers: list[LayerChunk] = []
    inp = x0
    with torch.no_grad():
        for l, cell in enumerate(plan.cells):
            inputs = plan.layer_input(l, inp)
            records, inp = _reverse_steps(record, l, weights[l], cell.project_input(inputs), state, t0)
            layers.append(LayerChunk(inputs, records))
    return layers, inp


def _reverse_steps(
    record: WindowRecord, l: int, w: list[Tensor], xp: Tensor, state: list[list[Tensor]], t0: int
) -> tuple[list[list[Record]], Tensor]:
    """Layer ``l``'s steps of one chunk in reverse: each step's records, and the layer's outputs ``(C, B, H)``.
    The state's float halves are carried from step to step (each step's records hold the floats before it),
    so only the chunk's last state is converted, and the outputs are stacked once per chunk."""
    plan = record.plan
    cell, buf, stored = plan.cells[l], record.buffers[l], plan.stored(l)
    records: list[list[Record]] = [[] for _ in range(xp.shape[0])]
    floats = [to_float(h) for h in state[l]]
    outputs: list[list[Tensor]] = []  # the h halves after each step, last step first
    for i in reversed(range(xp.shape[0])):
        outputs.append(floats[:2])
        stored_old = record.stored_before(t0 + i) if stored else None
        state[l], records[i] = plan.backend.reverse_step(
            cell, w, xp[i], state[l], floats, buf, plan.step_keep(t0 + i), stored_old
        )
        floats = cell.floats_before(records[i])
    return records, torch.cat([torch.stack(half[::-1]) for half in zip(*outputs)], -1)


def head_gradient(plan: WindowPlan, top: Tensor, t0: int, grad_primary: Tensor, grads: Gradients) -> Tensor:
    """The loss gradient of the top layer's outputs over one chunk ``(C, B, H)``: from the head, run once
    on the chunk (its parameters' and context's gradients accumulate in the same call), or the incoming
    gradient of the outputs without a head."""
    head = plan.head
    if head is None:
        return grad_primary[t0 : t0 + top.shape[0]]
    pairs = [(plan.extras[i], grads.extras[i]) for i in plan.head_slots]
    with plan.autocast.enter():
        d_out = head.accumulate_grads(top.detach().requires_grad_(), t0, grad_primary, pairs)
    return torch.zeros_like(top) if d_out is None else d_out


def backprop_chunk(
    plan: WindowPlan,
    weights: list[list[Tensor]],
    layers: list[LayerChunk],
    d_top: Tensor,
    t0: int,
    grads: Gradients,
) -> Tensor:
    """BPTT over one reconstructed chunk, top layer first: per step the backend's step backward (with its
    two small dh GEMMs), per chunk one GEMM each for the input gradient and the weight gradients. Returns
    the gradient of the first layer's input (before its dropout) ``(C, B, E)``."""
    with torch.no_grad():  # gradients written out: nothing here may record a graph
        d_out = d_top.detach()
        for l in reversed(range(len(plan.cells))):
            cell, chunk = plan.cells[l], layers[l]
            grads.state[l], d_xp = _backprop_steps(plan, l, weights[l], chunk, d_out, grads.state[l], t0)
            _hidden_weight_grads(cell, grads.weight_hh[l], chunk.records, d_xp)
            _linear_param_grads(grads.weight_ih[l], grads.bias[l], d_xp, chunk.inputs)
            d_out = masked(d_xp @ cell.weight_ih, plan.input_masks[l])
        return d_out


def _backprop_steps(
    plan: WindowPlan, l: int, w: list[Tensor], chunk: LayerChunk, d_out: Tensor, d_state: list[Tensor], t0: int
) -> tuple[list[Tensor], Tensor]:
    """Layer ``l``'s steps of one chunk backwards, from the gradient of its outputs ``d_out`` (``(C, B, H)``,
    or ``(C, B, S)`` for stored units) and of its state after the chunk: the gradient of its state before the
    chunk and of its input pre-activations ``(C, B, 2·rows)`` (stacked once per chunk)."""
    cell = plan.cells[l]
    d_pre: list[Tensor] = []  # last step first
    for i in reversed(range(len(chunk.records))):
        d_state, d_step = plan.backend.step_backward(
            cell, w, chunk.records[i], d_state, d_out[i], plan.step_keep(t0 + i)
        )
        d_pre.append(d_step)
    return d_state, torch.stack(d_pre[::-1])


def _hidden_weight_grads(cell: ReversibleCell, d_weight: Tensor, records: list[list[Record]], d_xp: Tensor) -> None:
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


def _check_reconstruction(buffers: list[InformationBuffer], diverged: Tensor, steps: int) -> None:
    """One host read: every chunk's reconstructed states matched forward's checksums and every buffer is
    back to empty; else a :class:`ReconstructionError` naming the layer and steps."""
    left = [b.remaining() for b in buffers]
    undone = all(b.multiplications == 0 for b in buffers)
    if undone and not bool(torch.stack([diverged.any(), *left]).any()):
        return
    bad = diverged.nonzero().tolist()
    if bad:
        chunk, l = max(bad)  # the reverse sweep meets the latest chunk first
        size = chunk_steps(steps)
        first, last = chunk * size, min((chunk + 1) * size, steps) - 1
        raise ReconstructionError(
            f"Reverse sweep diverged: layer {l}, reconstructing steps {first}..{last} "
            f"did not give the state forward had before step {first} bit for bit ({len(bad)} "
            "(chunk, layer) states differ). The saved buffer was modified, or forward and backward ran with "
            "different numerics (autocast, TF32, threads, device)."
        )
    for l, buf in enumerate(buffers):
        if not buf.is_empty():
            raise ReconstructionError(f"Reverse sweep of layer {l} reached the initial state with a non-empty buffer.")
