"""What every reversible cell shares: its parameters, the layout of its state, and how two half-steps make a step.

A cell's hidden state ``h = [h1; h2]`` (and cell state ``c = [c1; c2]`` for the LSTM types) is split into
halves of ``H/2`` units that are updated alternately (spec section 2): group 1 reads the *other* half ``h2``
and updates its own half, then group 2 reads the new ``h1``. A state is a list of int64 half tensors,
``[h1, h2]`` for GRU types and ``[h1, h2, c1, c2]`` for LSTM types.

A :class:`~lightning_revrnn.core.backend.Backend` runs a step as two half-steps: the cells' own equations
(:mod:`lightning_revrnn.core.cells`, the reference) or a fast backend computing the same ones.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.fixed_point import FORGET_ONE, to_fixed
from lightning_revrnn.core.records import LSTMRecord, Record

MAX_FORGET_BITS_CHOICES = (1, 2, 3, 5, None)
#: One group's new (or old) int halves and their float values.
Halves = tuple[list[Tensor], list[Tensor]]


class ReversibleCell(nn.Module):
    """Base of the four cells: parameters, state layout, and the reference backward of a step.

    Parameters: ``weight_ih`` (``2·rows × input_size``) and ``bias`` (``2·rows``) map the input to both
    groups' gate pre-activations (group 1 first); ``weight_hh`` (``2·rows × H/2``) holds each group's map
    from the other half. Subclasses define one group's equations: :meth:`half_forward`, :meth:`half_reverse`
    and :meth:`half_backward` (the reference backend runs them).

    Args:
        input_size: features of the layer's input.
        hidden_size: units of ``h`` (even: two halves of ``H/2``).
        max_forget_bits: at most this many bits forgotten per unit and step: 1, 2, 3, 5 or None (≤ R_Z).

    Example::

        >>> from lightning_revrnn.core.cells import RevLSTMCell
        >>> cell = RevLSTMCell(input_size=3, hidden_size=4)
        >>> cell.state_halves, cell.own(0), cell.own(1)  # [h1, h2, c1, c2]: group 1 owns h1 and c1
        (4, [0, 2], [1, 3])
        >>> halves = cell.split_state([torch.zeros(2, 4), torch.ones(2, 4)])  # [h, c] -> halves of H/2
        >>> [tuple(t.shape) for t in halves]
        [(2, 2), (2, 2), (2, 2), (2, 2)]
        >>> torch.equal(cell.join_state(halves)[1], torch.ones(2, 4))
        True
    """

    #: ``"gru"`` or ``"lstm"``: which equations (and record type) a backend runs for this cell.
    kind: ClassVar[str]
    #: Gate pre-activation rows per group.
    gate_rows: ClassVar[int]
    #: Whether the cell forgets (multiplies by a forget value through the buffer).
    forgets: ClassVar[bool] = True
    #: Half tensors owned by one group: 1 (h) or 2 (h, c).
    halves_per_group: ClassVar[int] = 1

    def __init__(self, input_size: int, hidden_size: int, max_forget_bits: int | None = 3) -> None:
        super().__init__()
        if hidden_size <= 0 or hidden_size % 2:
            raise ValueError(
                f"hidden_size must be a positive even number (the state is split into two halves), got "
                f"{hidden_size}. Fix: use {hidden_size + 1 if hidden_size > 0 else 2}."
            )
        if max_forget_bits not in MAX_FORGET_BITS_CHOICES:
            raise ValueError(f"max_forget_bits must be one of {MAX_FORGET_BITS_CHOICES}, got {max_forget_bits!r}.")
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}.")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.half_size = hidden_size // 2
        self.max_forget_bits = max_forget_bits
        self.weight_ih = nn.Parameter(torch.empty(2 * self.gate_rows * self.half_size, input_size))
        self.bias = nn.Parameter(torch.empty(2 * self.gate_rows * self.half_size))
        self.weight_hh = nn.Parameter(torch.empty(2 * self.hidden_rows, self.half_size))
        self.reset_parameters()

    @property
    def hidden_rows(self) -> int:
        """Rows of one group's hidden-to-hidden map (and of its input pre-activations)."""
        return self.gate_rows * self.half_size

    @property
    def state_halves(self) -> int:
        """Number of half tensors in a state."""
        return 2 * self.halves_per_group

    @property
    def multiplications_per_step(self) -> int:
        """Buffered multiplications per step (one per owned half and group)."""
        return self.state_halves if self.forgets else 0

    @property
    def forget_slope(self) -> float:
        """d(limited z)/dz: ``1 - 2^-k`` (1 without a limit, and for no-forgetting cells, whose gates are
        not limited)."""
        return 1.0 if self.max_forget_bits is None or not self.forgets else 1.0 - 2.0**-self.max_forget_bits

    def reset_parameters(self) -> None:
        """Uniform(-1/√H, 1/√H), as ``nn.GRU``/``nn.LSTM``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_forget_bits={self.max_forget_bits}"

    # ----------------------------------------------------------------------------------- state layout
    def project_input(self, x: Tensor) -> Tensor:
        """Both groups' input pre-activations: ``(..., 2·rows)``; one GEMM for a whole chunk of steps."""
        return F.linear(x, self.weight_ih, self.bias)

    def own(self, group: int) -> list[int]:
        """Indices in a state of the halves that ``group`` updates, h first."""
        return [group + 2 * j for j in range(self.halves_per_group)]

    def output(self, state_f: list[Tensor]) -> Tensor:
        """The layer's output ``h = [h1; h2]`` from float halves."""
        return torch.cat(state_f[:2], -1)

    def split_output(self, h: Tensor) -> list[Tensor]:
        """Inverse of :meth:`output`: the two h halves."""
        return list(h.split(self.half_size, -1))

    def split_state(self, full: list[Tensor]) -> list[Tensor]:
        """``[h]`` or ``[h, c]`` of shape ``(B, H)`` to this cell's list of halves (``[h1, h2(, c1, c2)]``)."""
        halves = [self.split_output(s) for s in full]
        return [halves[j][i] for j in range(len(full)) for i in (0, 1)]

    def join_state(self, halves: list[Tensor]) -> list[Tensor]:
        """Inverse of :meth:`split_state`: ``[h]`` or ``[h, c]`` of shape ``(B, H)``."""
        return [torch.cat(halves[2 * j : 2 * j + 2], 1) for j in range(self.halves_per_group)]

    @staticmethod
    def floats_before(records: list[Record]) -> list[Tensor]:
        """The float32 values of the state's halves before a step, from its two groups' records (each holds
        its old own halves as floats): ``[h1, h2]`` or ``[h1, h2, c1, c2]``, no conversion needed."""
        floats = [records[0].h_old, records[1].h_old]
        first, second = records
        if isinstance(first, LSTMRecord) and isinstance(second, LSTMRecord):
            floats += [first.c_old, second.c_old]
        return floats

    # --------------------------------------------------------------------------------- one group
    @abstractmethod
    def half_forward(
        self,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored: int = 0,
    ) -> Halves:
        """One group's update: new (int halves, float halves carrying the surrogate gradient). The first
        ``stored`` units of the own ``h`` are stored units (see :func:`store_units`)."""

    @abstractmethod
    def half_reverse(
        self,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored_old: Tensor | None = None,
    ) -> tuple[list[Tensor], Record]:
        """Undo one group's update: (old int halves, the step's record). ``own_f``: the own halves' float
        values after the update; ``stored_old``: the stored units' old values (int), which the buffer does
        not hold."""

    @abstractmethod
    def half_backward(
        self, w: Tensor, record: Record, d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Gradients of one group's update: (of the old own halves, of the gate pre-activations
        ``(B, rows)``, of the other half)."""

    @abstractmethod
    def hidden_inputs(self, record: Record) -> list[tuple[int, int, Tensor]]:
        """The inputs of the group's hidden GEMMs, ``(first row, stop row, input)``: what a chunk's
        hidden-weight gradient is formed from."""

    # ------------------------------------------------------------------------------------------ steps
    def backward_step(
        self,
        w: list[Tensor],
        records: list[Record],
        d_state: list[Tensor],
        d_output: Tensor,
        keep: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """Backpropagate one step from its records (the reference): gradients of the state before the step
        (from those of the state after it, ``d_state``, plus the step's output gradient ``d_output``) and of
        the step's input pre-activations ``(B, 2·rows)``."""
        grads = add_output_gradient(d_state, d_output)
        d_pre: list[Tensor] = [grads[0], grads[0]]
        for g in (1, 0):
            idx = self.own(g)
            d_old, d_pre[g], d_other = self.half_backward(w[g], records[g], [grads[i] for i in idx], keep)
            for i, d in zip(idx, d_old):
                grads[i] = d
            grads[1 - g] = grads[1 - g] + d_other
        return grads, torch.cat(d_pre, -1)


def add_output_gradient(d_state: list[Tensor], d_output: Tensor) -> list[Tensor]:
    """The state gradient with the step's output gradient added: ``d_output`` is ``(B, H)`` for the output
    ``h = [h1; h2]``, or ``(B, S)`` (``S < H/2``) for the stored units, the first ``S`` units of ``h1``."""
    d_state = list(d_state)
    n = d_state[0].shape[1]
    if d_output.shape[1] == 2 * n:
        d_state[0] = d_state[0] + d_output[:, :n]
        d_state[1] = d_state[1] + d_output[:, n:]
    else:
        d_state[0] = d_state[0] + F.pad(d_output, (0, n - d_output.shape[1]))
    return d_state


# ------------------------------------------------------------------------------------ stored units
def unbuffered(zq: Tensor | None, stored: int) -> Tensor | None:
    """``z*`` with its first ``stored`` units set to ``2^R_Z``: multiplying by it leaves those units (and
    their buffer words) as they are, so none of their bits enters the buffer."""
    if zq is None or not stored:
        return zq
    return torch.cat([torch.full_like(zq[:, :stored], FORGET_ONE), zq[:, stored:]], 1)


def store_units(h: Tensor, stored: int, value: Tensor) -> Tensor:
    """``h`` (int) with its first ``stored`` units replaced by ``to_fixed(value)``: *stored units*
    (attention slices, spec section 5), updated in float32 and kept by the caller instead of buffered.

    ``to_fixed`` of a float32 value is always exactly representable back in float32 (below 2 in magnitude
    it has at most 24 significant bits, above it is the float's own value), so the float32 tensor the
    sequence module returns for them holds the state exactly and the reverse sweep restores it from there.
    """
    if not stored:
        return h
    return torch.cat([to_fixed(value[:, :stored].detach()), h[:, stored:]], 1)


def restore_units(h: Tensor, stored_old: Tensor | None) -> Tensor:
    """Inverse of :func:`store_units` in the reverse sweep: the stored units' old values put back."""
    if stored_old is None:
        return h
    return torch.cat([stored_old, h[:, stored_old.shape[1] :]], 1)
