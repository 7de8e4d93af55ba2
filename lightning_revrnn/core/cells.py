"""The reversible cells: their parameters, their equations, one exact step forward and one in reverse.

A cell's hidden state ``h = [h1; h2]`` (and cell state ``c = [c1; c2]`` for the LSTM types) is split into
halves of ``H/2`` units that are updated alternately (spec section 2): group 1 reads the *other* half
``h2`` and updates its own half, then group 2 reads the new ``h1``. A state is a list of int64 half
tensors, ``[h1, h2]`` for GRU types and ``[h1, h2, c1, c2]`` for LSTM types: the layout lives in
:class:`ReversibleCell` (``own``, ``output``/``split_output``, ``split_state``/``join_state``).

Every gate is computed by :meth:`ReversibleCell._gates`, in forward and reverse alike, from the same
tensors with the same ops, so the reverse sweep recomputes them bit for bit. Rounding is straight-through:
the differentiable *surrogate* of an update is ``z·h_old + add`` with the rounded ``z``, and its value is
replaced by the exact fixed-point result.

**Padding (keep masks).** A step may carry a keep mask ``(B, 1)`` (bool). Where it is False the update
is made the identity in the one place the equations form it (``_update``, via :func:`hold`): rounded
forget values ``z* = FORGET_ONE`` (``reversible_multiply``/``divide`` by ``2^R_Z`` leave both ``h*`` and
the buffer word unchanged, bit for bit, and add ``-log2(z*/2^R_Z) = 0`` optimal bits), their float
surrogate exactly 1 and every additive term exactly 0. The reverse step forms the same values, so it
undoes the step identically; masked rows pass ``dh_old = dh_new`` and give no gradient to gates or
parameters (``torch.where`` routes none to the unselected branch).
"""

from __future__ import annotations

import functools
import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_revrnn.buffer import InformationBuffer
from lightning_revrnn import fused as stages
from lightning_revrnn.fixed_point import FORGET_ONE, straight_through, to_fixed, to_float
from lightning_revrnn.gates import forget_scale, forget_scaled, gru_gates, hold, lstm_gates, masked, round_forget

__all__ = ["forget_scale", "hold"]  # re-exported: their home is lightning_revrnn.gates

MAX_FORGET_BITS_CHOICES = (1, 2, 3, 5, None)


class ReversibleCell(nn.Module):
    """Base of the four cells: parameters, gate layout, and one group's exact half-step forward, in reverse,
    and its backward.

    Parameters: ``weight_ih`` (``2·rows × input_size``) and ``bias`` (``2·rows``) map the input to both
    groups' gate pre-activations (group 1 first); ``weight_hh`` (``2·rows × H/2``) holds each group's map
    from the other half.

    Three functions per group (subclasses define them, one screen each):

    * :meth:`_half_forward`: gates → rounded forget values → fixed-point multiply with the buffer → add.
      ``forward_step`` runs it in evaluation, ``mode="store"`` (autograd records it) and the forward of
      ``mode="reverse"`` alike.
    * :meth:`_half_reverse`: the same gates and rounded forget values from the same tensors, then subtract
      and divide: the exact previous half, plus a *record* of the step's gate values for its backward.
    * :meth:`_fused_half_forward` / :meth:`_fused_half_reverse`: the same two as compiled stages (the
      fused path, :attr:`fused`), used where no autograd records (:meth:`uses_fused`).
    * :meth:`_half_backward`: the step's gradient from its record, written out (no autograd), checked
      against autograd through :meth:`_half_forward` by the tests (``mode="store"``).
    """

    #: Gate pre-activation rows per group.
    gate_rows: int
    #: Whether the cell forgets (multiplies by a forget value through the buffer).
    forgets: bool = True
    #: Half tensors owned by one group: 1 (h) or 2 (h, c).
    halves_per_group: int = 1
    #: Units per half (``hidden_size // 2``).
    half_size: int
    #: Where a group's record holds its old own halves as floats: (h, c) positions (c: LSTM types only).
    record_float_positions: tuple[int, int] = (-1, -1)
    #: Run the half-steps as compiled stages (:mod:`lightning_revrnn.fused`) wherever no autograd records
    #: (the forward of ``mode="reverse"``, evaluation, the reverse sweep); set by ``ReversibleRNN(fused=...)``.
    fused: bool = False

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

    def reset_parameters(self) -> None:
        """Uniform(-1/√H, 1/√H), as ``nn.GRU``/``nn.LSTM``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_forget_bits={self.max_forget_bits}"

    # ----------------------------------------------------------------------------------------- helpers
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

    def _forget(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """k-limited forget value rounded to ``R_Z`` bits: (int ``z*``, float ``z*/2^R_Z`` carrying the
        gradient of the limited ``z``, straight through the rounding). ``z·(1-2^-k)·2^R_Z + 2^(R_Z-k)``
        rounds exactly like ``limit_forget(z)·2^R_Z`` (scaling by a power of two is exact)."""
        scaled = forget_scaled(z, self.max_forget_bits)
        zq, value = round_forget(scaled, self.max_forget_bits)
        if scaled.requires_grad:
            value = straight_through(value, scaled / FORGET_ONE)
        return zq, value

    def uses_fused(self) -> bool:
        """Whether the half-steps run as compiled stages now: :attr:`fused` and no autograd recording (the
        stages have no autograd; ``mode="store"`` differentiates the eager cells)."""
        return self.fused and not torch.is_grad_enabled()

    @property
    def forget_slope(self) -> float:
        """d(limited z)/dz: ``1 - 2^-k`` (1 without a limit, and for no-forgetting cells, whose gates are
        not limited)."""
        return 1.0 if self.max_forget_bits is None or not self.forgets else 1.0 - 2.0**-self.max_forget_bits

    # ------------------------------------------------------------------------------------- equations
    @abstractmethod
    def _half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, keep: Tensor | None, stored: int = 0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One group's update: new (int halves, float halves carrying the surrogate gradient). The first
        ``stored`` units of the own ``h`` are stored units (see :func:`store_units`)."""

    @abstractmethod
    def _half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None, stored_old: Tensor | None = None,
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """Undo one group's update: (old int halves, the step's record for :meth:`_half_backward`).
        ``stored_old``: the stored units' old values (int), which the buffer does not hold."""

    @abstractmethod
    def _fused_half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, keep: Tensor | None, stored: int = 0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`_half_forward` as compiled stages (no autograd): new (int halves, their float values)."""

    @abstractmethod
    def _fused_half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None, stored_old: Tensor | None = None, own_f: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """:meth:`_half_reverse` as compiled stages: it undoes exactly what :meth:`_fused_half_forward` did
        (the same compiled gate stage forms every value that feeds rounding), with its record. ``own_f``: the
        own halves' float32 values when the caller has them (else converted where needed)."""

    @abstractmethod
    def _half_backward(
        self, w: Tensor, record: tuple[Tensor, ...], d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Gradients of one group's update: (of the old own halves, of the gate pre-activations
        ``(B, rows)``, of the other half)."""

    @abstractmethod
    def hidden_inputs(self, record: tuple[Tensor, ...]) -> list[tuple[int, int, Tensor]]:
        """The inputs of the group's hidden GEMMs, ``(first row, stop row, input)``: what a chunk's
        hidden-weight gradient is formed from."""

    # ------------------------------------------------------------------------------------------ steps
    def forward_step(
        self, w: list[Tensor], xp: Tensor, state: list[Tensor], state_f: list[Tensor],
        buf: InformationBuffer, keep: Tensor | None = None, stored: int = 0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One exact step: group 1 from ``h2``, then group 2 from the new ``h1``. Rows where ``keep``
        (``(B, 1)`` bool, None: all) is False keep their state and buffer words bit for bit. The first
        ``stored`` units of ``h1`` are stored units (:func:`store_units`)."""
        state, state_f = list(state), list(state_f)
        xps = xp.split(self.hidden_rows, -1)
        half_forward = self._fused_half_forward if self.uses_fused() else self._half_forward
        for g in (0, 1):
            idx = self.own(g)
            new, new_f = half_forward(
                w[g], xps[g], state_f[1 - g], [state[i] for i in idx], [state_f[i] for i in idx], buf, keep,
                stored if g == 0 else 0,
            )
            for i, v, f in zip(idx, new, new_f):
                state[i], state_f[i] = v, f
        return state, state_f

    def reverse_step(
        self, w: list[Tensor], xp: Tensor, state: list[Tensor], buf: InformationBuffer, keep: Tensor | None = None,
        stored_old: Tensor | None = None, floats: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], list[tuple[Tensor, ...]]]:
        """Reconstruct the state before a step exactly: group 2 (which read the new ``h1``), then group 1
        (which read the restored ``h2``). Returns the int halves before the step and the two groups'
        records (group 1 first) for :meth:`backward_step`. ``xp`` and ``keep`` as given to forward;
        ``stored_old``: the stored units of ``h1`` before the step (int), when the step had any.
        ``floats``: the float32 values of ``state``'s halves when the caller has them (the fused sweep
        carries them, see :meth:`floats_before`); without them each other half is converted here."""
        old = list(state)
        xps = xp.split(self.hidden_rows, -1)
        records: list[tuple[Tensor, ...]] = [(), ()]
        fused = self.uses_fused()
        for g in (1, 0):
            idx = self.own(g)
            own, stored = [old[i] for i in idx], stored_old if g == 0 else None
            if floats is None:
                other = to_float(old[1 - g])
            else:  # h1 after the step (given), then h2 before it (in group 2's record)
                other = floats[0] if g else records[1][self.record_float_positions[0]]
            if fused:  # a group's own halves are still those after the step when it is undone
                own_f = None if floats is None else [floats[i] for i in idx]
                prev, records[g] = self._fused_half_reverse(w[g], xps[g], other, own, buf, keep, stored, own_f)
            else:
                prev, records[g] = self._half_reverse(w[g], xps[g], other, own, buf, keep, stored)
            for i, v in zip(idx, prev):
                old[i] = v
        return old, records

    def floats_before(self, records: list[tuple[Tensor, ...]]) -> list[Tensor]:
        """The float32 values of the state's halves before a step, from its records (both groups' records
        hold their old own halves as floats, eager and fused alike): no conversion needed."""
        h_at, c_at = self.record_float_positions
        floats = [records[0][h_at], records[1][h_at]]
        if self.halves_per_group == 2:
            floats += [records[0][c_at], records[1][c_at]]
        return floats

    def fused_backward_step(
        self, w: list[Tensor], records: list[tuple[Tensor, ...]], grads: list[Tensor], d_output: Tensor,
        keep: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """:meth:`backward_step` as one compiled stage, from the fused records: it also adds the step's output
        gradient ``d_output`` (``(B, H)``, or ``(B, S)`` for stored units) into ``grads`` first."""
        kind = "lstm" if self.halves_per_group == 2 else "gru"
        stage = stages.step_backward_stage(kind, self.forget_slope, self.forgets)
        return stage(w, records, grads, d_output, keep)

    def backward_step(
        self, w: list[Tensor], records: list[tuple[Tensor, ...]], grads: list[Tensor], keep: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Backpropagate one step from its records: gradients of the state before the step (from those of
        the state after it, ``grads``) and of the step's input pre-activations ``(B, 2·rows)``."""
        grads = list(grads)
        d_pre: list[Tensor] = [grads[0], grads[0]]
        for g in (1, 0):
            idx = self.own(g)
            d_old, d_pre[g], d_other = self._half_backward(w[g], records[g], [grads[i] for i in idx], keep)
            for i, d in zip(idx, d_old):
                grads[i] = d
            grads[1 - g] = grads[1 - g] + d_other
        return grads, torch.cat(d_pre, -1)


@functools.lru_cache(maxsize=16)
def _slopes(n: int, slope: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[slope]·n + [1]·2n + [slope]·n``: the LSTM sigmoid block's gate slopes (see ``_gate_slopes``)."""
    return torch.tensor([slope] * n + [1.0] * (2 * n) + [slope] * n, device=device, dtype=dtype)


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


def apply_update(buf: InformationBuffer, h: Tensor, z: Tensor | None, add: Tensor) -> tuple[Tensor, Tensor]:
    """Fused path, one half: ``h*·z*/2^R_Z + add`` through the buffer (``h* + add`` without forgetting,
    ``z`` None), as one compiled integer stage. Returns the new int half and its float32 value."""
    return stages.add_term()(h, add) if z is None else buf.fused_multiply(h, z, add)


def undo_update(buf: InformationBuffer, h: Tensor, z: Tensor | None, add: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`apply_update`: the old int half and its float32 value."""
    return stages.subtract_term()(h, add) if z is None else buf.fused_divide(h, add, z)


class RevGRUCell(ReversibleCell):
    """Reversible GRU (spec section 2)::

        [z1; r1] = σ(W1 [x; h2])    g1 = tanh(U1 [x; r1 ∘ h2])    h1 ← z1 ∘ h1 + (1 − z1) ∘ g1
        [z2; r2] = σ(W2 [x; h1])    g2 = tanh(U2 [x; r2 ∘ h1])    h2 ← z2 ∘ h2 + (1 − z2) ∘ g2

    with ``z`` limited to forget at most ``max_forget_bits`` per step and rounded to ``R_Z`` bits.
    Gate rows per group: ``z``, ``r`` (from ``W``) then ``g`` (from ``U``). A step's record:
    ``(other, r∘other, σ([z; r]), g, z*/2^R_Z, h_old)`` (floats; the forget factor 1 at masked rows; the
    fused path's holds ``z, r`` as two tensors in place of the block).
    """

    gate_rows = 3

    def _gates(self, w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(σ([z; r]) as one block, g, r∘other)`` from the input pre-activations and the other half."""
        return gru_gates(w, xp, other)

    def _update(self, z: Tensor, g: Tensor, keep: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
        """(int ``z*`` or None without forgetting, the factor on the old h, the additive term); the
        identity update where ``keep`` is False (see :func:`hold`)."""
        zq, zs = self._forget(z)
        (zq,), (zs,), (add,) = hold(keep, [zq], [zs], [torch.addcmul(g, zs, g, value=-1.0)])  # (1 − z)·g
        return zq, zs, add

    def _half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, keep: Tensor | None, stored: int = 0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        zr, g, _ = self._gates(w, xp, other)
        zq, zs, add = self._update(zr[:, : self.half_size], g, keep)
        zq = unbuffered(zq, stored)
        h = own[0] if zq is None else buf.multiply(own[0], zq)
        h_new = zs * own_f[0] + add
        h = store_units(h + to_fixed(add.detach()), stored, h_new)
        return [h], [straight_through(to_float(h), h_new)]

    def _half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None, stored_old: Tensor | None = None,
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        zr, g, r_other = self._gates(w, xp, other)
        zq, zs, add = self._update(zr[:, : self.half_size], g, keep)
        zq = unbuffered(zq, 0 if stored_old is None else stored_old.shape[1])
        h = own[0] - to_fixed(add)
        h = restore_units(h if zq is None else buf.divide(h, zq), stored_old)
        return [h], (other, r_other, zr, g, zs, to_float(h))

    def _fused_half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, keep: Tensor | None, stored: int = 0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        *_, zq, zs, add, add_fixed = stages.gru_gate_stage(self.max_forget_bits, self.forgets)(w, xp, other, keep)
        h, h_f = apply_update(buf, own[0], unbuffered(zq, stored), add_fixed)
        if stored:
            h = store_units(h, stored, zs * own_f[0] + add)
            h_f = to_float(h)
        return [h], [h_f]

    def _fused_half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None, stored_old: Tensor | None = None, own_f: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        z, r, g, r_other, zq, zs, _, add_fixed = stages.gru_gate_stage(self.max_forget_bits, self.forgets)(
            w, xp, other, keep
        )
        zq = unbuffered(zq, 0 if stored_old is None else stored_old.shape[1])
        h, h_f = undo_update(buf, own[0], zq, add_fixed)
        if stored_old is not None:
            h = restore_units(h, stored_old)
            h_f = to_float(h)
        return [h], (other, r_other, z, r, g, zs, h_f)  # the fused record: one gate a tensor

    def _half_backward(
        self, w: Tensor, record: tuple[Tensor, ...], d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        other, _, zr, g, zs, h_old = record
        n = self.half_size
        d_h = d_new[0]
        # h_new = zs·h_old + (1 − zs)·g, zs = round(limit(z)) straight through (no forgetting: zs = 1,
        # h_new = h_old + (1 − z)·g).
        if self.forgets:
            d_z = masked(d_h * (h_old - g), keep) * self.forget_slope
            d_g = d_h * (1.0 - zs)  # 0 at masked rows (zs = 1 there)
        else:
            d_z = masked(d_h * g, keep).neg_()
            d_g = masked(d_h * (1.0 - zr[:, :n]), keep)
        d_pre_g = torch.ops.aten.tanh_backward(d_g, g)
        d_r_other = d_pre_g @ w[2 * n :]
        d_pre_zr = torch.ops.aten.sigmoid_backward(torch.cat([d_z, d_r_other * other], 1), zr)
        d_other = torch.addmm(d_r_other * zr[:, n:], d_pre_zr, w[: 2 * n])
        return [d_h * zs], torch.cat([d_pre_zr, d_pre_g], 1), d_other

    def hidden_inputs(self, record: tuple[Tensor, ...]) -> list[tuple[int, int, Tensor]]:
        n = self.half_size
        return [(0, 2 * n, record[0]), (2 * n, 3 * n, record[1])]


class NFRevGRUCell(RevGRUCell):
    """No-forgetting RevGRU: ``h1 ← h1 + (1 − z1) ∘ g1`` (pure additive coupling, no buffer)."""

    forgets = False

    def _update(self, z: Tensor, g: Tensor, keep: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
        add = (1.0 - z) * g
        return None, torch.ones_like(z), add if keep is None else torch.where(keep, add, 0.0)


class RevLSTMCell(ReversibleCell):
    """Reversible LSTM (spec section 2)::

        [f1; i1; o1; p1] = σ(W1 [x; h2])    g1 = tanh(U1 [x; h2])
        c1 ← f1 ∘ c1 + i1 ∘ g1              h1 ← p1 ∘ h1 + o1 ∘ tanh(c1)

    then group 2 from the new ``h1``. ``f`` and ``p`` are limited and rounded forget values; order in a
    step ``c1, h1, c2, h2``, in reverse ``h2, c2, h1, c1``. Gate rows per group: ``f, i, o, p, g``. A
    step's record: ``(other, σ([f; i; o; p]), g, f*, p*, o held, h_old, c_old, c_new)`` (floats).
    """

    gate_rows = 5
    halves_per_group = 2
    record_float_positions = (-3, -2)

    def _gates(self, w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
        """``(σ([f; i; o; p]) as one block, g)`` from the input pre-activations and the other half."""
        return lstm_gates(w, xp, other)

    def _gate_slopes(self, like: Tensor) -> Tensor:
        """Per unit of the sigmoid block, d(gate used)/d(sigmoid): the forget limit's slope for ``f`` and
        ``p`` (0 without forgetting: the cell never uses them), 1 for ``i`` and ``o``."""
        slope = self.forget_slope if self.forgets else 0.0
        return _slopes(self.half_size, slope, like.device, like.dtype)

    def _update(
        self, f: Tensor, i: Tensor, o: Tensor, p: Tensor, g: Tensor, keep: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        """(``f*``, ``p*`` or None, factors on old c and h, ``i∘g``, ``o``). Where ``keep`` is False the
        identity update (:func:`hold`): ``o = 0`` makes the additive term of h, ``o∘tanh(c)``, exactly 0."""
        n = self.half_size
        fpq, fps = self._forget(torch.cat([f, p], 1))  # both forget gates rounded in one pass (elementwise)
        fq, pq, fs, ps = fpq[:, :n], fpq[:, n:], fps[:, :n], fps[:, n:]
        (fq, pq), (fs, ps), (add_c, o) = hold(keep, [fq, pq], [fs, ps], [i * g, o])
        return fq, pq, fs, ps, add_c, o

    def _half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, keep: Tensor | None, stored: int = 0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        h, c = own
        sig, g = self._gates(w, xp, other)
        fq, pq, fs, ps, add_c, o = self._update(*sig.split(self.half_size, 1), g, keep)
        c = (c if fq is None else buf.multiply(c, fq)) + to_fixed(add_c.detach())
        c_f = straight_through(to_float(c), fs * own_f[1] + add_c)
        add_h = o * torch.tanh(c_f)
        pq = unbuffered(pq, stored)
        h_new = ps * own_f[0] + add_h
        h = store_units((h if pq is None else buf.multiply(h, pq)) + to_fixed(add_h.detach()), stored, h_new)
        return [h, c], [straight_through(to_float(h), h_new), c_f]

    def _half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None, stored_old: Tensor | None = None,
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        h, c = own
        sig, g = self._gates(w, xp, other)
        fq, pq, fs, ps, add_c, o_held = self._update(*sig.split(self.half_size, 1), g, keep)
        pq = unbuffered(pq, 0 if stored_old is None else stored_old.shape[1])
        c_new = to_float(c)
        h = h - to_fixed(o_held * torch.tanh(c_new))
        h = restore_units(h if pq is None else buf.divide(h, pq), stored_old)
        c = c - to_fixed(add_c)
        c = c if fq is None else buf.divide(c, fq)
        return [h, c], (other, sig, g, fs, ps, o_held, to_float(h), to_float(c), c_new)

    def _fused_half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, keep: Tensor | None, stored: int = 0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        h, c = own
        gates = stages.lstm_gate_stage(self.max_forget_bits, self.forgets)(w, xp, other, keep)
        *_, fq, pq, _, ps, _, add_c_fixed, o = gates
        c, c_f = apply_update(buf, c, fq, add_c_fixed)
        add_h, add_h_fixed = stages.lstm_h_term()(o, c_f)
        h, h_f = apply_update(buf, h, unbuffered(pq, stored), add_h_fixed)
        if stored:
            h = store_units(h, stored, ps * own_f[0] + add_h)
            h_f = to_float(h)
        return [h, c], [h_f, c_f]

    def _fused_half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None, stored_old: Tensor | None = None, own_f: list[Tensor] | None = None,
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        h, c = own
        gates = stages.lstm_gate_stage(self.max_forget_bits, self.forgets)(w, xp, other, keep)
        sig, g, fq, pq, fs, ps, _, add_c_fixed, o_held = gates
        c_new = to_float(c) if own_f is None else own_f[1]
        _, add_h_fixed = stages.lstm_h_term()(o_held, c_new)
        h, h_f = undo_update(buf, h, unbuffered(pq, 0 if stored_old is None else stored_old.shape[1]), add_h_fixed)
        if stored_old is not None:
            h = restore_units(h, stored_old)
            h_f = to_float(h)
        c, c_f = undo_update(buf, c, fq, add_c_fixed)
        return [h, c], (other, sig, g, fs, ps, o_held, h_f, c_f, c_new)

    def _half_backward(
        self, w: Tensor, record: tuple[Tensor, ...], d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        _, sig, g, fs, ps, o_held, h_old, c_old, c_new = record
        n = self.half_size
        d_h, d_c = d_new
        tanh_c = torch.tanh(c_new)
        # h_new = ps·h_old + o·tanh(c_new), c_new = fs·c_old + i·g (fs = ps = 1 without forgetting).
        d_c = d_c + torch.ops.aten.tanh_backward(d_h * o_held, tanh_c)
        d_sig = torch.cat([d_c * c_old, d_c * g, d_h * tanh_c, d_h * h_old], 1)  # d f, i, o, p (used)
        d_pre = torch.cat([
            torch.ops.aten.sigmoid_backward(d_sig, sig) * self._gate_slopes(sig),
            torch.ops.aten.tanh_backward(d_c * sig[:, n : 2 * n], g),
        ], 1)
        d_pre = masked(d_pre, keep)
        return [d_h * ps, d_c * fs], d_pre, d_pre @ w

    def hidden_inputs(self, record: tuple[Tensor, ...]) -> list[tuple[int, int, Tensor]]:
        return [(0, 5 * self.half_size, record[0])]


class NFRevLSTMCell(RevLSTMCell):
    """No-forgetting RevLSTM: ``c1 ← c1 + i1 ∘ g1``, ``h1 ← h1 + o1 ∘ tanh(c1)`` (no buffer)."""

    forgets = False

    def _update(
        self, f: Tensor, i: Tensor, o: Tensor, p: Tensor, g: Tensor, keep: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        one = torch.ones_like(f)
        _, _, (add_c, o) = hold(keep, [], [], [i * g, o])
        return None, None, one, one, add_c, o
