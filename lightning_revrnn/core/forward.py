"""The one forward over a window: evaluation, ``mode="store"`` (autograd through it) and the forward of
``mode="reverse"`` all run :func:`run_forward`, so every mode computes bit-identical states.

Chunk by chunk, layer by layer: a layer's input projection is one GEMM per chunk of
:func:`~lightning_revrnn.core.protocol.chunk_steps` steps, then its steps; the reverse sweep recomputes each chunk in
the same order and shapes. The forward reads the device once, at its end (:func:`_end_of_window_read`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import store_units
from lightning_revrnn.core.fixed_point import RangeGuard, straight_through, to_float
from lightning_revrnn.core.numerics import cells_context
from lightning_revrnn.core.protocol import chunk_steps
from lightning_revrnn.core.window import WindowPlan, state_checksum


@dataclass(frozen=True)
class WindowResult:
    """What a window's forward computed.

    ``primary``: the outputs ``(T, B, units)`` (the top layer's, or its stored units), or with a head the
    head's sum over the window. ``state``: each layer's final int halves. ``finals``: the final ``h`` (and
    ``c``) per layer as float32, flat in layer order, carrying the float surrogate's gradient;
    ``final_exact``: the same in float64, exact (for an exact carry). ``buffers``: each layer's information
    buffer, compacted. ``stored_initial``: the stored units before the window (int), when there are any.
    """

    primary: Tensor
    state: list[list[Tensor]]
    finals: list[Tensor]
    final_exact: list[Tensor]
    buffers: list[InformationBuffer]
    stored_initial: Tensor | None


def run_forward(
    plan: WindowPlan,
    x: Tensor,
    state: list[list[Tensor]],
    state_f: list[list[Tensor]],
    initial: list[Tensor],
    out: Tensor | None = None,
    checksums: Tensor | None = None,
) -> WindowResult:
    """Run the window forward from each layer's int halves ``state`` and their float values ``state_f`` (the
    cells with autocast off, the stem and head under the caller's). ``initial``: the caller's initial state
    tensors, range-checked with the rest. Without a head the outputs are written into ``out`` when given
    (else returned as one tensor with its graph); ``checksums[c, l]`` receives the fingerprint of layer ``l``'s
    state before chunk ``c``. Raises :class:`~lightning_revrnn.core.errors.FixedPointOverflowError` when a
    value that feeds rounding left the fixed-point range."""
    guard = RangeGuard()
    for i, t in enumerate(initial):
        guard.observe(f"initial state tensor {i}", t)
    buffers = plan.new_buffers(x.shape[1], x.shape[0], x.device)
    state, state_f = [list(s) for s in state], [list(s) for s in state_f]
    stored_initial = None
    if plan.stored_units:  # stored units hold float32 values exactly (to_fixed ∘ to_float keeps a float32 value)
        top = state[-1]
        top[0] = store_units(top[0], plan.stored_units, to_float(top[0]))
        stored_initial = top[0][:, : plan.stored_units]
    with cells_context(x.device):
        results = _chunks(plan, x, state, state_f, buffers, guard, out, checksums)
        finals, final_exact = _finals(plan, state, state_f, guard)
    _end_of_window_read(guard, buffers)
    primary = torch.stack(results).sum() if plan.head is not None else out if out is not None else torch.cat(results)
    return WindowResult(primary, state, finals, final_exact, buffers, stored_initial)


def _chunks(
    plan: WindowPlan,
    x: Tensor,
    state: list[list[Tensor]],
    state_f: list[list[Tensor]],
    buffers: list[InformationBuffer],
    guard: RangeGuard,
    out: Tensor | None,
    checksums: Tensor | None,
) -> list[Tensor]:
    """The time loop (``state``/``state_f`` advance in place): per chunk the head's value or the outputs."""
    weights = []
    for l, c in enumerate(plan.cells):
        hidden = plan.hidden_weights(l)
        guard.observe(f"layer {l}: hidden weights", hidden)
        weights.append(list(hidden.split(c.hidden_rows, 0)))
    results: list[Tensor] = []
    chunk = chunk_steps(x.shape[0])
    for t0 in range(0, x.shape[0], chunk):
        t1 = min(t0 + chunk, x.shape[0])
        inp = plan.chunk_input(x, t0, t1)
        for l, cell in enumerate(plan.cells):
            if checksums is not None:
                checksums[t0 // chunk, l] = state_checksum(state[l])
            xp = plan.projection(l, inp)
            guard.observe(f"layer {l}: input pre-activations", xp)
            outs = []
            for t in range(t0, t1):
                state[l], state_f[l] = plan.backend.forward_step(
                    cell,
                    weights[l],
                    xp[t - t0],
                    state[l],
                    state_f[l],
                    buffers[l],
                    plan.step_keep(t),
                    plan.stored(l),
                )
                outs.append(cell.output(state_f[l]))
            inp = torch.stack(outs)
        if plan.head is not None:
            results.append(plan.head_value(inp, t0))
        elif out is not None:
            out[t0:t1] = plan.output_units(inp)
        else:
            results.append(plan.output_units(inp))
    return results


def _finals(
    plan: WindowPlan, state: list[list[Tensor]], state_f: list[list[Tensor]], guard: RangeGuard
) -> tuple[list[Tensor], list[Tensor]]:
    """The final states per layer and ``h``/``c``: float32 (the correctly rounded value, carrying the float
    surrogate's gradient) and float64 (exact), flat in layer order."""
    rounded: list[Tensor] = []
    exact_all: list[Tensor] = []
    for l, (cell, ints, floats) in enumerate(zip(plan.cells, state, state_f)):
        exact = [to_float(i, torch.float64) for i in ints]
        for k, h in enumerate(exact):
            guard.observe(f"layer {l}: final state half {k}", h)
        rounded += cell.join_state([straight_through(to_float(i), f) for i, f in zip(ints, floats)])
        exact_all += cell.join_state(exact)
    return rounded, exact_all


def _end_of_window_read(guard: RangeGuard, buffers: list[InformationBuffer]) -> None:
    """The forward's one host read: whether every range the guard observed is fine, and for every buffer how
    many slots it drained, its deepest stack and its final words' bits (the buffers then compact and pack)."""
    flag = guard.in_range()
    sizes = [b.window_sizes() for b in buffers]
    parts = ([] if flag is None else [flag.reshape(1).long()]) + sizes
    host = torch.cat(parts).tolist() if parts else []
    if flag is not None:
        guard.check(bool(host.pop(0)))
    for buf, size in zip(buffers, sizes):
        if size.numel():
            buf.finish(host[: size.numel()])
            host = host[size.numel() :]
