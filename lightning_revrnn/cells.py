"""The reversible cells: their parameters, their equations, one exact step forward and one in reverse.

A cell's hidden state ``h = [h1; h2]`` (and cell state ``c = [c1; c2]`` for the LSTM types) is split into
halves of ``H/2`` units that are updated alternately (spec section 2): group 1 reads the *other* half
``h2`` and updates its own half, then group 2 reads the new ``h1``. A state is a list of int64 half
tensors, ``[h1, h2]`` for GRU types and ``[h1, h2, c1, c2]`` for LSTM types.

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

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_revrnn.buffer import InformationBuffer
from lightning_revrnn.fixed_point import (
    FORGET_ONE,
    RangeGuard,
    limit_forget,
    quantize_forget,
    straight_through,
    to_fixed,
    to_float,
)

MAX_FORGET_BITS_CHOICES = (1, 2, 3, 5, None)


def hold(keep: Tensor | None, forget_ints: list[Tensor | None], factors: list[Tensor], adds: list[Tensor]) -> tuple[
    list[Tensor | None], list[Tensor], list[Tensor]
]:
    """Make one half-update the identity where ``keep`` (``(B, 1)`` bool) is False.

    Rounded forget values become ``FORGET_ONE`` (an exact identity multiplication: the buffer word and
    ``h*`` are unchanged), float factors exactly 1, additive terms exactly 0. ``keep=None``: unchanged.
    """
    if keep is None:
        return forget_ints, factors, adds
    ints = [None if q is None else torch.where(keep, q, FORGET_ONE) for q in forget_ints]
    return ints, [torch.where(keep, f, 1.0) for f in factors], [torch.where(keep, a, 0.0) for a in adds]


class ReversibleCell(nn.Module):
    """Base of the four cells. Subclasses define the gate layout and the two half-steps.

    Parameters: ``weight_ih`` (``2·rows × input_size``) and ``bias`` (``2·rows``) map the input to both
    groups' gate pre-activations (group 1 first); ``weight_hh`` (``2·rows_hh × H/2``) holds each group's
    map from the other half.
    """

    #: Gate pre-activation rows per group from the input.
    gate_rows: int
    #: Whether the cell forgets (multiplies by a forget value through the buffer).
    forgets: bool = True
    #: Half tensors owned by one group: 1 (h) or 2 (h, c).
    halves_per_group: int = 1
    #: Units per half (``hidden_size // 2``).
    half_size: int

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
        self._products: list[HiddenProduct] | None = None
        self.reset_parameters()

    @property
    def hidden_rows(self) -> int:
        """Rows of one group's hidden-to-hidden map."""
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
        """Both groups' input pre-activations for one step: ``(B, 2·rows)``."""
        return F.linear(x, self.weight_ih, self.bias)

    def own(self, group: int) -> list[int]:
        """Indices in a state of the halves that ``group`` updates, h first."""
        return [group + 2 * j for j in range(self.halves_per_group)]

    def output(self, state_f: list[Tensor]) -> Tensor:
        """The layer's output ``h = [h1; h2]`` from float halves."""
        return torch.cat(state_f[:2], 1)

    def split_output(self, h: Tensor) -> list[Tensor]:
        """Inverse of :meth:`output`: the two h halves."""
        return list(h.split(self.half_size, 1))

    def _hidden(self, x: Tensor, w: Tensor, start: int, stop: int) -> Tensor:
        """``x @ w[start:stop]ᵀ``, a hidden-to-hidden product. During :meth:`reverse_step` each product is
        recorded, so the weight gradient is formed once per chunk of steps instead of once per step."""
        out = F.linear(x, w[start:stop])
        if self._products is not None:
            self._products.append(HiddenProduct(start, stop, out, x.detach()))
        return out

    def _forget(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """k-limited forget value: (int ``z*``, float with value ``z*/2^R_Z`` and the gradient of ``z``)."""
        z = limit_forget(z, self.max_forget_bits)
        zq, value = quantize_forget(z.detach(), self.max_forget_bits)
        return zq, straight_through(value, z)

    # ------------------------------------------------------------------------------------- equations
    @abstractmethod
    def _half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, guard: RangeGuard, keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One group's update: new (int halves, float halves carrying the surrogate gradient)."""

    @abstractmethod
    def _half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Undo one group's update: (old int halves, their float leaves, surrogates of the new halves)."""

    # ------------------------------------------------------------------------------------------ steps
    def forward_step(
        self, w: list[Tensor], xp: Tensor, state: list[Tensor], state_f: list[Tensor],
        buf: InformationBuffer, guard: RangeGuard, keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One exact step: group 1 from ``h2``, then group 2 from the new ``h1``. Rows where ``keep``
        (``(B, 1)`` bool, None: all) is False keep their state and buffer words bit for bit."""
        state, state_f = list(state), list(state_f)
        xps = xp.split(self.hidden_rows, 1)
        for g in (0, 1):
            idx = self.own(g)
            new, new_f = self._half_forward(
                w[g], xps[g], state_f[1 - g], [state[i] for i in idx], [state_f[i] for i in idx], buf, guard, keep
            )
            for i, v, f in zip(idx, new, new_f):
                state[i], state_f[i] = v, f
        return state, state_f

    def reverse_step(
        self, w: list[Tensor], xp: Tensor, state: list[Tensor], grads: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor], Tensor, list[list[HiddenProduct]]]:
        """Reconstruct the previous state exactly and backpropagate one step.

        Args:
            w: per-group hidden weights for the window (as in forward; no grad needed).
            xp: the step's input pre-activations (computed exactly as in forward).
            state: int halves after the step; ``grads``: the loss gradient for each of them.
            keep: the step's keep mask as given to :meth:`forward_step` (None: every row stepped).

        Returns: (int halves before the step, their gradients, gradient of ``xp``, and per group the
        hidden products with their output gradients, from which the caller forms the weight gradient).
        """
        old, dold = list(state), list(grads)
        xps = [p.detach().requires_grad_() for p in xp.split(self.hidden_rows, 1)]
        dxps: list[Tensor] = [xp, xp]
        products: list[list[HiddenProduct]] = [[], []]
        # Group 2 read the new h1: make it a leaf, undo group 2, then group 1 reads the restored h2.
        other = to_float(state[0]).requires_grad_()
        for g in (1, 0):
            idx = self.own(g)
            self._products = []
            try:
                prev, leaves, sur = self._half_reverse(w[g], xps[g], other, [state[i] for i in idx], buf, keep)
                products[g] = self._products
            finally:
                self._products = None
            outs = [p.out for p in products[g]]
            d = torch.autograd.grad(
                sur, [xps[g], other, *leaves, *outs], [dold[i] for i in idx], allow_unused=True
            )
            dxps[g] = _or_zeros(d[0], xps[g])
            dother = _or_zeros(d[1], other)
            for i, v, dv, leaf in zip(idx, prev, d[2 : 2 + len(leaves)], leaves):
                old[i], dold[i] = v, _or_zeros(dv, leaf)
            for p, dout in zip(products[g], d[2 + len(leaves) :]):
                p.grad = _or_zeros(dout, p.out)
                p.out = p.grad  # the graph is not needed any more; keep only what the caller uses
            dold[1 - g] = dold[1 - g] + dother
            other = leaves[0]
        return old, dold, torch.cat(dxps, 1), products


class HiddenProduct:
    """One hidden-to-hidden product of a step: rows ``start:stop`` of a group's weights applied to
    ``inputs``; after the step's backward, ``grad`` holds the gradient of its output."""

    __slots__ = ("start", "stop", "out", "inputs", "grad")

    def __init__(self, start: int, stop: int, out: Tensor, inputs: Tensor) -> None:
        self.start, self.stop, self.out, self.inputs = start, stop, out, inputs
        self.grad: Tensor | None = None


def _or_zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


class RevGRUCell(ReversibleCell):
    """Reversible GRU (spec section 2)::

        [z1; r1] = σ(W1 [x; h2])    g1 = tanh(U1 [x; r1 ∘ h2])    h1 ← z1 ∘ h1 + (1 − z1) ∘ g1
        [z2; r2] = σ(W2 [x; h1])    g2 = tanh(U2 [x; r2 ∘ h1])    h2 ← z2 ∘ h2 + (1 − z2) ∘ g2

    with ``z`` limited to forget at most ``max_forget_bits`` per step and rounded to ``R_Z`` bits.
    Gate rows per group: ``z``, ``r`` (from ``W``) then ``g`` (from ``U``).
    """

    gate_rows = 3

    def _gates(self, w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = self.half_size
        zr = torch.sigmoid(xp[:, : 2 * n] + self._hidden(other, w, 0, 2 * n))
        z, r = zr[:, :n], zr[:, n:]
        g = torch.tanh(xp[:, 2 * n :] + self._hidden(r * other, w, 2 * n, 3 * n))
        return z, r, g

    def _update(
        self, w: Tensor, xp: Tensor, other: Tensor, keep: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """(int ``z*`` or None without forgetting, the factor on the old h, the additive term); the
        identity update where ``keep`` is False (see :func:`hold`)."""
        z, _, g = self._gates(w, xp, other)
        zq, zs = self._forget(z)
        (zq,), (zs,), (add,) = hold(keep, [zq], [zs], [(1.0 - zs) * g])
        return zq, zs, add

    def _half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, guard: RangeGuard, keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        zq, zs, add = self._update(w, xp, other, keep)
        guard.observe(add)
        h = own[0] if zq is None else buf.multiply(own[0], zq)
        h = h + to_fixed(add.detach())
        return [h], [straight_through(to_float(h), zs * own_f[0] + add)]

    def _half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        zq, zs, add = self._update(w, xp, other, keep)
        h = own[0] - to_fixed(add.detach())
        h = h if zq is None else buf.divide(h, zq)
        leaf = to_float(h).requires_grad_()
        return [h], [leaf], [zs * leaf + add]


class NFRevGRUCell(RevGRUCell):
    """No-forgetting RevGRU: ``h1 ← h1 + (1 − z1) ∘ g1`` (pure additive coupling, no buffer)."""

    forgets = False

    def _update(
        self, w: Tensor, xp: Tensor, other: Tensor, keep: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        z, _, g = self._gates(w, xp, other)
        add = (1.0 - z) * g
        return None, torch.ones_like(z), add if keep is None else torch.where(keep, add, 0.0)


class RevLSTMCell(ReversibleCell):
    """Reversible LSTM (spec section 2)::

        [f1; i1; o1; p1] = σ(W1 [x; h2])    g1 = tanh(U1 [x; h2])
        c1 ← f1 ∘ c1 + i1 ∘ g1              h1 ← p1 ∘ h1 + o1 ∘ tanh(c1)

    then group 2 from the new ``h1``. ``f`` and ``p`` are limited and rounded forget values; order in a
    step ``c1, h1, c2, h2``, in reverse ``h2, c2, h1, c1``. Gate rows per group: ``f, i, o, p, g``.
    """

    gate_rows = 5
    halves_per_group = 2

    def _gates(self, w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = self.half_size
        pre = xp + self._hidden(other, w, 0, 5 * n)
        f, i, o, p = torch.sigmoid(pre[:, : 4 * n]).split(n, 1)
        return f, i, o, p, torch.tanh(pre[:, 4 * n :])

    def _update(
        self, w: Tensor, xp: Tensor, other: Tensor, keep: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        """(``f*``, ``p*`` or None, factors on old c and h, ``i∘g``, ``o``). Where ``keep`` is False the
        identity update (:func:`hold`): ``o = 0`` makes the additive term of h, ``o∘tanh(c)``, exactly 0."""
        f, i, o, p, g = self._gates(w, xp, other)
        fq, fs = self._forget(f)
        pq, ps = self._forget(p)
        (fq, pq), (fs, ps), (add_c, o) = hold(keep, [fq, pq], [fs, ps], [i * g, o])
        return fq, pq, fs, ps, add_c, o

    def _half_forward(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], own_f: list[Tensor],
        buf: InformationBuffer, guard: RangeGuard, keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        h, c = own
        fq, pq, fs, ps, add_c, o = self._update(w, xp, other, keep)
        guard.observe(add_c + fs + ps)
        c = (c if fq is None else buf.multiply(c, fq)) + to_fixed(add_c.detach())
        c_f = straight_through(to_float(c), fs * own_f[1] + add_c)
        add_h = o * torch.tanh(c_f)
        guard.observe(add_h)
        h = (h if pq is None else buf.multiply(h, pq)) + to_fixed(add_h.detach())
        return [h, c], [straight_through(to_float(h), ps * own_f[0] + add_h), c_f]

    def _half_reverse(
        self, w: Tensor, xp: Tensor, other: Tensor, own: list[Tensor], buf: InformationBuffer,
        keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        h, c = own
        fq, pq, fs, ps, add_c, o = self._update(w, xp, other, keep)
        c_new = to_float(c)
        h = h - to_fixed((o * torch.tanh(c_new)).detach())
        h = h if pq is None else buf.divide(h, pq)
        c = c - to_fixed(add_c.detach())
        c = c if fq is None else buf.divide(c, fq)
        h_leaf, c_leaf = to_float(h).requires_grad_(), to_float(c).requires_grad_()
        c_sur = straight_through(c_new, fs * c_leaf + add_c)
        return [h, c], [h_leaf, c_leaf], [ps * h_leaf + o * torch.tanh(c_sur), c_sur]


class NFRevLSTMCell(RevLSTMCell):
    """No-forgetting RevLSTM: ``c1 ← c1 + i1 ∘ g1``, ``h1 ← h1 + o1 ∘ tanh(c1)`` (no buffer)."""

    forgets = False

    def _update(
        self, w: Tensor, xp: Tensor, other: Tensor, keep: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        f, i, o, p, g = self._gates(w, xp, other)
        one = torch.ones_like(f)
        _, _, (add_c, o) = hold(keep, [], [], [i * g, o])
        return None, None, one, one, add_c, o
