"""The four reversible cells and their equations: one group's exact half-step forward, in reverse, and its
backward. These are the reference backend (:class:`~lightning_revrnn.core.backend.EagerBackend`); a fast
backend computes the same equations and is tested against them.

Every gate is computed by the cell's ``_gates`` (:mod:`lightning_revrnn.core.gates`), in forward and reverse
alike, from the same tensors with the same ops, so the reverse sweep recomputes them bit for bit. Rounding is
straight-through: the differentiable *surrogate* of an update is ``z·h_old + add`` with the rounded ``z``,
and its value is replaced by the exact fixed-point result.

**Padding (keep masks).** A step may carry a keep mask ``(B, 1)`` (bool). Where it is False the update is
made the identity in the one place the equations form it (``_update``, via
:func:`~lightning_revrnn.core.gates.hold`): rounded forget values ``z* = FORGET_ONE`` (multiplying and
dividing by ``2^R_Z`` leave both ``h*`` and the buffer word unchanged, bit for bit, and add no optimal
bits), their float surrogate exactly 1 and every additive term exactly 0. The reverse step forms the same
values, so it undoes the step identically; masked rows pass ``dh_old = dh_new`` and give no gradient to gates
or parameters (``torch.where`` routes none to the unselected branch).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import Halves, ReversibleCell, restore_units, store_units, unbuffered
from lightning_revrnn.core.fixed_point import FORGET_ONE, straight_through, to_fixed, to_float
from lightning_revrnn.core.gates import forget_scaled, gru_gates, hold, lstm_gates, masked, round_forget
from lightning_revrnn.core.records import GRURecord, LSTMRecord, Record


def rounded_forget(z: Tensor, max_forget_bits: int | None) -> tuple[Tensor, Tensor]:
    """k-limited forget value rounded to ``R_Z`` bits: (int ``z*``, float ``z*/2^R_Z`` carrying the gradient
    of the limited ``z``, straight through the rounding). The limit is ``(1 - 2^-k)·z + 2^-k``, so that at most
    ``k`` bits are forgotten per multiplication (:func:`~lightning_revrnn.core.gates.forget_scaled`)."""
    scaled = forget_scaled(z, max_forget_bits)
    zq, value = round_forget(scaled, max_forget_bits)
    if scaled.requires_grad:
        value = straight_through(value, scaled / FORGET_ONE)
    return zq, value


@functools.lru_cache(maxsize=16)
def _slopes(n: int, slope: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[slope]·n + [1]·2n + [slope]·n``: the LSTM sigmoid block's gate slopes (see ``_gate_slopes``)."""
    return torch.tensor([slope] * n + [1.0] * (2 * n) + [slope] * n, device=device, dtype=dtype)


class RevGRUCell(ReversibleCell):
    """Reversible GRU (spec section 2)::

        [z1; r1] = σ(W1 [x; h2])    g1 = tanh(U1 [x; r1 ∘ h2])    h1 ← z1 ∘ h1 + (1 − z1) ∘ g1
        [z2; r2] = σ(W2 [x; h1])    g2 = tanh(U2 [x; r2 ∘ h1])    h2 ← z2 ∘ h2 + (1 − z2) ∘ g2

    with ``z`` limited to forget at most ``max_forget_bits`` per step and rounded to ``R_Z`` bits. Gate rows
    per group: ``z``, ``r`` (from ``W``) then ``g`` (from ``U``). Records:
    :class:`~lightning_revrnn.core.records.GRURecord`.

    Example::

        >>> cell = RevGRUCell(input_size=8, hidden_size=16)
        >>> cell.weight_hh.shape  # each group's map from the other half: 2 groups x 3 gates x 8 units
        torch.Size([48, 8])
    """

    kind = "gru"
    gate_rows = 3

    def _gates(self, w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(σ([z; r]) as one block, g, r∘other)`` from the input pre-activations and the other half."""
        return gru_gates(w, xp, other)

    def _update(self, z: Tensor, g: Tensor, keep: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
        """(int ``z*`` or None without forgetting, the factor on the old h, the additive term); the
        identity update where ``keep`` is False (see :func:`~lightning_revrnn.core.gates.hold`)."""
        rounded, zs = rounded_forget(z, self.max_forget_bits)
        (zq,), (zs,), (add,) = hold(keep, [rounded], [zs], [torch.addcmul(g, zs, g, value=-1.0)])  # (1 − z)·g
        return zq, zs, add

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
        zr, g, _ = self._gates(w, xp, other)
        zq, zs, add = self._update(zr[:, : self.half_size], g, keep)
        zq = unbuffered(zq, stored)
        h = own[0] if zq is None else buf.multiply(own[0], zq)
        h_new = zs * own_f[0] + add
        h = store_units(h + to_fixed(add.detach()), stored, h_new)
        return [h], [straight_through(to_float(h), h_new)]

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
        zr, g, r_other = self._gates(w, xp, other)
        zq, zs, add = self._update(zr[:, : self.half_size], g, keep)
        zq = unbuffered(zq, 0 if stored_old is None else stored_old.shape[1])
        h = own[0] - to_fixed(add)
        h = restore_units(h if zq is None else buf.divide(h, zq), stored_old)
        z, r = zr.split(self.half_size, 1)
        return [h], GRURecord(other, r_other, z, r, g, zs, to_float(h), zr)

    def half_backward(
        self, w: Tensor, record: Record, d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        assert isinstance(record, GRURecord) and record.zr is not None, "the reference backward reads its own records"
        other, zr, g, zs, h_old = record.other, record.zr, record.g, record.z_used, record.h_old
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

    def hidden_inputs(self, record: Record) -> list[tuple[int, int, Tensor]]:
        assert isinstance(record, GRURecord)
        n = self.half_size
        return [(0, 2 * n, record.other), (2 * n, 3 * n, record.r_other)]


class NFRevGRUCell(RevGRUCell):
    """No-forgetting RevGRU: ``h1 ← h1 + (1 − z1) ∘ g1`` (pure additive coupling, no buffer).

    Example::

        >>> NFRevGRUCell(8, 16).multiplications_per_step  # nothing goes through a buffer
        0
    """

    forgets = False

    def _update(self, z: Tensor, g: Tensor, keep: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
        add = (1.0 - z) * g
        return None, torch.ones_like(z), add if keep is None else torch.where(keep, add, 0.0)


class RevLSTMCell(ReversibleCell):
    """Reversible LSTM (spec section 2)::

        [f1; i1; o1; p1] = σ(W1 [x; h2])    g1 = tanh(U1 [x; h2])
        c1 ← f1 ∘ c1 + i1 ∘ g1              h1 ← p1 ∘ h1 + o1 ∘ tanh(c1)

    then group 2 from the new ``h1``. ``f`` and ``p`` are limited and rounded forget values; order in a
    step ``c1, h1, c2, h2``, in reverse ``h2, c2, h1, c1``. Gate rows per group: ``f, i, o, p, g``.
    Records: :class:`~lightning_revrnn.core.records.LSTMRecord`.

    Example::

        >>> RevLSTMCell(8, 16).multiplications_per_step  # f and p of both groups
        4
    """

    kind = "lstm"
    gate_rows = 5
    halves_per_group = 2

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
        identity update (:func:`~lightning_revrnn.core.gates.hold`): ``o = 0`` makes the additive term of h,
        ``o∘tanh(c)``, exactly 0."""
        n = self.half_size
        fpq, fps = rounded_forget(torch.cat([f, p], 1), self.max_forget_bits)  # both forget gates in one pass
        (fq, pq), (fs, ps), (add_c, o) = hold(keep, [fpq[:, :n], fpq[:, n:]], [fps[:, :n], fps[:, n:]], [i * g, o])
        return fq, pq, fs, ps, add_c, o

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
        h, c = own
        sig, g = self._gates(w, xp, other)
        f, i, o, p = sig.split(self.half_size, 1)
        fq, pq, fs, ps, add_c, o = self._update(f, i, o, p, g, keep)
        c = (c if fq is None else buf.multiply(c, fq)) + to_fixed(add_c.detach())
        c_f = straight_through(to_float(c), fs * own_f[1] + add_c)
        add_h = o * torch.tanh(c_f)
        pq = unbuffered(pq, stored)
        h_new = ps * own_f[0] + add_h
        h = store_units((h if pq is None else buf.multiply(h, pq)) + to_fixed(add_h.detach()), stored, h_new)
        return [h, c], [straight_through(to_float(h), h_new), c_f]

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
        h, c = own
        sig, g = self._gates(w, xp, other)
        f, i, o, p = sig.split(self.half_size, 1)
        fq, pq, fs, ps, add_c, o_held = self._update(f, i, o, p, g, keep)
        pq = unbuffered(pq, 0 if stored_old is None else stored_old.shape[1])
        c_new = own_f[1]
        h = h - to_fixed(o_held * torch.tanh(c_new))
        h = restore_units(h if pq is None else buf.divide(h, pq), stored_old)
        c = c - to_fixed(add_c)
        c = c if fq is None else buf.divide(c, fq)
        return [h, c], LSTMRecord(other, sig, g, fs, ps, o_held, to_float(h), to_float(c), c_new)

    def half_backward(
        self, w: Tensor, record: Record, d_new: list[Tensor], keep: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        assert isinstance(record, LSTMRecord)
        _, sig, g, fs, ps, o_held, h_old, c_old, c_new = record
        n = self.half_size
        d_h, d_c = d_new
        tanh_c = torch.tanh(c_new)
        # h_new = ps·h_old + o·tanh(c_new), c_new = fs·c_old + i·g (fs = ps = 1 without forgetting).
        d_c = d_c + torch.ops.aten.tanh_backward(d_h * o_held, tanh_c)
        d_sig = torch.cat([d_c * c_old, d_c * g, d_h * tanh_c, d_h * h_old], 1)  # d f, i, o, p (used)
        d_pre = torch.cat(
            [
                torch.ops.aten.sigmoid_backward(d_sig, sig) * self._gate_slopes(sig),
                torch.ops.aten.tanh_backward(d_c * sig[:, n : 2 * n], g),
            ],
            1,
        )
        d_pre = masked(d_pre, keep)
        return [d_h * ps, d_c * fs], d_pre, d_pre @ w

    def hidden_inputs(self, record: Record) -> list[tuple[int, int, Tensor]]:
        return [(0, 5 * self.half_size, record.other)]


class NFRevLSTMCell(RevLSTMCell):
    """No-forgetting RevLSTM: ``c1 ← c1 + i1 ∘ g1``, ``h1 ← h1 + o1 ∘ tanh(c1)`` (no buffer).

    Example::

        >>> NFRevLSTMCell(8, 16).forgets
        False
    """

    forgets = False

    def _update(
        self, f: Tensor, i: Tensor, o: Tensor, p: Tensor, g: Tensor, keep: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        one = torch.ones_like(f)
        _, _, (add_c, o) = hold(keep, [], [], [i * g, o])
        return None, None, one, one, add_c, o
