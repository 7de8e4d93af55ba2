"""A window's plan: everything its forward and its reverse sweep both read, fixed before the forward runs.

The plan never changes after it is built: the forward returns what it computed (:class:`~lightning_revrnn.core.
forward.WindowResult`) instead of writing into it, and the reverse sweep reads the plan and that result.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_revrnn.core.backend import Backend
from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import ReversibleCell
from lightning_revrnn.core.dropout import SeededMask
from lightning_revrnn.core.graph_checks import declared_context, trainable
from lightning_revrnn.core.numerics import AutocastState
from lightning_revrnn.core.protocol import StepHead, StepStem


@dataclass(frozen=True)
class WindowPlan:
    """What one window's forward and reverse share (host objects, not differentiated).

    ``backend``: computes every half-step of the window, forward and reverse alike. ``input_masks``: each
    layer's locked dropout mask (inputs of layer 0, between layers above); ``hidden_masks``: DropConnect
    seeds. ``retain``: the buffers keep what a reverse sweep needs (training). ``keep``: padding,
    ``(T, B, 1)`` bool, False where example ``b`` skips step ``t``. ``stored_units``: the first units of the
    top layer's ``h1`` are stored every step instead of buffered, and are the window's outputs.
    ``extras``: the tensors besides the cells' parameters that the sweep returns gradients for (the head's and
    stem's trainable parameters and declared context, each once: a tied weight is one entry);
    ``head_slots``/``stem_slots`` index into it. Build it with :meth:`build`.
    """

    cells: tuple[ReversibleCell, ...]
    backend: Backend
    input_masks: tuple[Tensor | None, ...]
    hidden_masks: tuple[SeededMask | None, ...]
    retain: bool
    autocast: AutocastState
    head: StepHead | None = None
    stem: StepStem | None = None
    keep: Tensor | None = None
    stored_units: int = 0
    extras: tuple[Tensor, ...] = ()
    head_slots: tuple[int, ...] = ()
    stem_slots: tuple[int, ...] = ()

    @classmethod
    def build(
        cls,
        cells: Sequence[ReversibleCell],
        backend: Backend,
        input_masks: Sequence[Tensor | None],
        hidden_masks: Sequence[SeededMask | None],
        retain: bool,
        autocast: AutocastState,
        head: StepHead | None = None,
        stem: StepStem | None = None,
        keep: Tensor | None = None,
        stored_units: int = 0,
    ) -> WindowPlan:
        """A plan with its ``extras`` collected from the head and the stem."""
        extras: list[Tensor] = []
        head_slots = tuple(_slot(extras, t) for t in [*trainable(head), *declared_context(head)])
        stem_slots = tuple(_slot(extras, t) for t in [*trainable(stem), *declared_context(stem)])
        return cls(
            tuple(cells),
            backend,
            tuple(input_masks),
            tuple(hidden_masks),
            retain,
            autocast,
            head,
            stem,
            keep,
            stored_units,
            tuple(extras),
            head_slots,
            stem_slots,
        )

    def new_buffers(self, batch: int, steps: int, device: torch.device) -> list[InformationBuffer]:
        """Fresh (empty) buffers, one per layer, for this window's forward of ``steps`` steps."""
        return [
            InformationBuffer(
                (batch, c.half_size), device, c.max_forget_bits, self.retain, steps * c.multiplications_per_step
            )
            for c in self.cells
        ]

    def chunk_input(self, inputs: Tensor, t0: int, t1: int) -> Tensor:
        """The first layer's float32 input for steps ``t0..t1-1`` (through the stem, if any, under the
        caller's autocast), before input dropout."""
        if self.stem is None:
            return inputs[t0:t1]
        with self.autocast.enter():
            x: Tensor = self.stem(inputs[t0:t1])
        return x.float()

    def head_value(self, output: Tensor, start: int) -> Tensor:
        """The head on ``output`` (steps ``start..``), under the caller's autocast."""
        assert self.head is not None
        with self.autocast.enter():
            value: Tensor = self.head(output, start)
        return value

    def projection(self, layer: int, inputs: Tensor) -> Tensor:
        """A layer's input pre-activations for one chunk, ``(C, B, 2·rows)`` from its inputs ``(C, B, ·)``
        before dropout: one GEMM per chunk, the same in forward and reverse (chunks always start at multiples
        of the chunk length, :func:`~lightning_revrnn.core.protocol.chunk_steps`, so the shapes agree too)."""
        return self.cells[layer].project_input(self.layer_input(layer, inputs))

    def layer_input(self, layer: int, x: Tensor) -> Tensor:
        """Apply the layer's locked dropout mask (inputs for layer 0, between layers above)."""
        mask = self.input_masks[layer]
        return x if mask is None else x * mask

    def hidden_weights(self, layer: int) -> Tensor:
        """The layer's hidden-to-hidden weights for this window (DropConnect mask redrawn from its seed)."""
        cell, mask = self.cells[layer], self.hidden_masks[layer]
        return cell.weight_hh if mask is None else cell.weight_hh * mask.materialize()

    def stored(self, layer: int) -> int:
        """How many stored units ``layer``'s ``h1`` has (only the top layer's may)."""
        return self.stored_units if layer == len(self.cells) - 1 else 0

    def output_units(self, top: Tensor) -> Tensor:
        """The window's outputs from the top layer's ``(…, H)`` outputs: all, or the stored units."""
        return top[..., : self.stored_units] if self.stored_units else top

    def step_keep(self, t: int) -> Tensor | None:
        """Step ``t``'s keep mask ``(B, 1)`` for every layer's cell, or None without padding."""
        return None if self.keep is None else self.keep[t]


def _slot(extras: list[Tensor], t: Tensor) -> int:
    """Index of ``t`` in ``extras`` (by identity), appending it the first time."""
    for i, e in enumerate(extras):
        if e is t:
            return i
    extras.append(t)
    return len(extras) - 1


@functools.lru_cache(maxsize=16)
def _mix(shape: torch.Size, device: torch.device) -> Tensor:
    """Odd position weights for :func:`state_checksum` (a bounded cache: a few shapes per model)."""
    numel = shape.numel()
    return torch.arange(1, 2 * numel + 1, 2, device=device, dtype=torch.int64).view(shape)


def state_checksum(state: list[Tensor]) -> Tensor:
    """An int64 fingerprint of a state: a position-weighted sum of all halves, exact modulo 2^64."""
    flat = torch.stack(state)
    return (flat * _mix(flat.shape, flat.device)).sum()
