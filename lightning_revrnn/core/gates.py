"""The cells' gate equations as pure functions of tensors and constants.

The eager cells (:mod:`lightning_revrnn.core.cells`) and the compiled stages of the fused path
(:mod:`lightning_revrnn.fused`) call these same functions, so both paths implement one set of equations;
a compiled stage is this code traced by ``torch.compile``. They hold no module state: everything a
gate depends on is an argument (sizes come from the tensors' shapes, the forget limit ``k`` is a
Python constant), which lets one compiled function serve every layer of the same shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_revrnn.core.fixed_point import FORGET_ONE, forget_floor


def forget_scale(max_forget_bits: int | None) -> tuple[float, float]:
    """``(scale, offset)`` with ``z·scale + offset = ((1 - 2^-k)·z + 2^-k)·2^R_Z``, the k-limited forget value in
    units of ``2^-R_Z`` (exact constants)."""
    if max_forget_bits is None:
        return float(FORGET_ONE), 0.0
    floor = 2.0**-max_forget_bits
    return (1.0 - floor) * FORGET_ONE, floor * FORGET_ONE


def forget_scaled(z: Tensor, max_forget_bits: int | None) -> Tensor:
    """The k-limited forget value ``((1 - 2^-k)·z + 2^-k)·2^R_Z`` (float), the value :func:`round_forget` rounds."""
    scale, offset = forget_scale(max_forget_bits)
    return z * scale + offset


def round_forget(scaled: Tensor, max_forget_bits: int | None) -> tuple[Tensor, Tensor]:
    """``scaled`` (from :func:`forget_scaled`) rounded to ``R_Z`` bits and clamped to the allowed range:
    (int64 ``z*``, float ``z*/2^R_Z``), no gradient."""
    zq = torch.round(scaled.detach()).clamp_(forget_floor(max_forget_bits), FORGET_ONE)
    return zq.to(torch.int64), zq / FORGET_ONE


def hold(
    keep: Tensor | None, forget_ints: list[Tensor | None], factors: list[Tensor], adds: list[Tensor]
) -> tuple[list[Tensor | None], list[Tensor], list[Tensor]]:
    """Make one half-update the identity where ``keep`` (``(B, 1)`` bool) is False.

    Rounded forget values become ``FORGET_ONE`` (an exact identity multiplication: the buffer word and
    ``h*`` are unchanged), float factors exactly 1, additive terms exactly 0. ``keep=None``: unchanged.
    """
    if keep is None:
        return forget_ints, factors, adds
    ints = [None if q is None else torch.where(keep, q, FORGET_ONE) for q in forget_ints]
    return ints, [torch.where(keep, f, 1.0) for f in factors], [torch.where(keep, a, 0.0) for a in adds]


def masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` times ``mask`` (a keep mask's rows zeroed, or a dropout mask applied); ``mask=None``: ``x`` itself."""
    return x if mask is None else x * mask


def gru_gates(w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A RevGRU group's gates: ``(σ([z; r]) as one block, g, r∘other)`` from its input pre-activations
    ``xp`` ``(B, 3n)``, its hidden weights ``w`` ``(3n, n)`` and the other half ``other`` ``(B, n)``."""
    n = other.shape[1]
    zr = torch.sigmoid(torch.addmm(xp[:, : 2 * n], other, w[: 2 * n].t()))
    r_other = zr[:, n:] * other
    g = torch.tanh(torch.addmm(xp[:, 2 * n :], r_other, w[2 * n :].t()))
    return zr, g, r_other


def lstm_gates(w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """A RevLSTM group's gates: ``(σ([f; i; o; p]) as one block, g)`` from its input pre-activations
    ``xp`` ``(B, 5n)``, its hidden weights ``w`` ``(5n, n)`` and the other half ``other`` ``(B, n)``."""
    n = other.shape[1]
    pre = torch.addmm(xp, other, w.t())
    return torch.sigmoid(pre[:, : 4 * n]), torch.tanh(pre[:, 4 * n :])


# ------------------------------------------------------------------------------------- one per gate
def gru_gates_split(w: Tensor, xp: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`gru_gates` one gate a tensor, ``(z, r, g, r∘other)`` each ``(B, n)``, for the compiled stages:
    every elementwise output before the second GEMM then shares one iteration space (one loop, one kernel),
    where ``σ([z; r])`` as a block needs a loop of its own."""
    n = other.shape[1]
    pre = torch.addmm(xp[:, : 2 * n], other, w[: 2 * n].t())
    z, r = torch.sigmoid(pre[:, :n]), torch.sigmoid(pre[:, n:])
    r_other = r * other
    g = torch.tanh(torch.addmm(xp[:, 2 * n :], r_other, w[2 * n :].t()))
    return z, r, g, r_other
