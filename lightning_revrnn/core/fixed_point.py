"""Fixed-point arithmetic of reversible RNNs (spec section 3).

Hidden and cell values are int64 tensors ``h*`` with ``R_H`` fractional bits (``h = h* · 2^-R_H``).
Forget values are rounded to ``R_Z`` bits, ``1 ≤ z* ≤ 2^R_Z``. :func:`reversible_multiply` scales a
fixed-point value by ``z*/2^R_Z`` and moves the bits that the scaling destroys into a per-unit buffer
word; :func:`reversible_divide` is its exact inverse. Everything here is elementwise and vectorised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_revrnn.core.errors import FixedPointOverflowError

#: Fractional bits of hidden and cell values.
R_H = 23
#: Fractional bits of forget values.
R_Z = 10
#: ``2^R_Z``: the fixed-point "one" of a forget value.
FORGET_ONE = 1 << R_Z
#: Largest magnitude a hidden or cell value may reach. It keeps ``|h*| < 2^53``, so a state converts to
#: float64 and back exactly, and every integer step stays far from int64 wrap-around.
MAX_ABS_VALUE = 2.0**30
_SCALE = float(1 << R_H)
_INV_SCALE = 1.0 / _SCALE
_LOW_MASK = FORGET_ONE - 1


def forget_floor(max_forget_bits: int | None) -> int:
    """Smallest allowed ``z*``: ``2^(R_Z - k)`` for a limit of ``k`` bits, 1 without a limit."""
    if max_forget_bits is None:
        return 1
    return 1 << (R_Z - max_forget_bits)


def bits_per_multiply(max_forget_bits: int | None) -> int:
    """Upper bound on the bits one multiplication adds to a buffer word (``log2(2^R_Z / z*_min)``)."""
    return R_Z if max_forget_bits is None else max_forget_bits


def to_fixed(x: Tensor) -> Tensor:
    """Round a float tensor to fixed point (int64, ``R_H`` fractional bits). No range check: see :class:`RangeGuard`."""
    return torch.round(x * _SCALE).to(torch.int64)


def to_float(h: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed point to float; exact in float64 (``|h*| < 2^53``), correctly rounded in float32."""
    if dtype == torch.get_default_dtype():
        return torch.mul(h, _INV_SCALE)  # one op: the int is converted to ``dtype``, then scaled exactly
    return h.to(dtype) * _INV_SCALE


def straight_through(exact: Tensor, surrogate: Tensor) -> Tensor:
    """Value of ``exact`` (bit for bit), gradient of ``surrogate``: rounding treated as identity."""
    if not surrogate.requires_grad:
        return exact
    return exact + (surrogate - surrogate.detach())


def reversible_multiply(h: Tensor, z: Tensor, word: Tensor) -> tuple[Tensor, Tensor]:
    """``h* ← h*·z*/2^R_Z`` exactly invertibly; the lost low bits go into ``word`` (all int64, ``word ≥ 0``).

    ``word ← word·2^R_Z + (h* mod 2^R_Z)``; ``h* ← ⌊h*/2^R_Z⌋·z* + (word mod z*)``; ``word ← ⌊word/z*⌋``.
    The caller guarantees ``word < 2^(63 - R_Z)`` beforehand (see
    :class:`~lightning_revrnn.core.buffer.InformationBuffer`).
    """
    word = torch.add(h & _LOW_MASK, word, alpha=FORGET_ONE)
    quotient = torch.div(word, z, rounding_mode="floor")
    h = torch.addcmul(torch.addcmul(word, quotient, z, value=-1), h >> R_Z, z)  # (h >> R_Z)·z + word mod z
    return h, quotient


def reversible_divide(h: Tensor, z: Tensor, word: Tensor) -> tuple[Tensor, Tensor]:
    """Exact inverse of :func:`reversible_multiply`: returns the ``(h*, word)`` it was given."""
    quotient = torch.div(h, z, rounding_mode="floor")
    word = torch.addcmul(torch.addcmul(h, quotient, z, value=-1), word, z)  # word·z + h mod z
    h = torch.add(word & _LOW_MASK, quotient, alpha=FORGET_ONE)
    return h, word >> R_Z


class RangeGuard:
    """Collects, on the device, the largest magnitude of each named group of values that feed fixed-point
    rounding, and checks them all with one host read per window (:meth:`check`).

    The sweep observes what can make a rounding wrap: the initial state, each chunk's input
    pre-activations, the hidden weights and the final state. Nothing else needs a per-step check: with
    finite pre-activations every gate is in [0, 1] or [-1, 1], so every additive term of an update is in
    [-1, 1] and a state grows by at most 1 per step (spec section 3).
    """

    def __init__(self) -> None:
        self.peaks: dict[str, Tensor] = {}

    def observe(self, what: str, x: Tensor) -> None:
        """Fold ``max |x|`` (float64; NaN stays NaN) into the peak of ``what``."""
        m = x.detach().abs().amax().double() if x.numel() else x.new_zeros((), dtype=torch.float64)
        prev = self.peaks.get(what)
        self.peaks[what] = m if prev is None else torch.maximum(prev, m)

    def in_range(self) -> Tensor | None:
        """On the device: whether every observed peak is finite and within ±2^30 (None: nothing observed)."""
        if not self.peaks:
            return None
        return (torch.stack(list(self.peaks.values())) < MAX_ABS_VALUE).all()

    def check(self, in_range: bool | None = None) -> None:
        """Raise :class:`FixedPointOverflowError` naming the first group whose peak was non-finite or beyond
        ±2^30. One host read, unless the caller read :meth:`in_range` itself and passes it. The peaks are
        cleared either way."""
        if in_range is None:
            flag = self.in_range()
            in_range = flag is None or bool(flag)
        peaks, self.peaks = self.peaks, {}
        if in_range:
            return
        for what, peak in peaks.items():
            if not bool(peak < MAX_ABS_VALUE):
                raise FixedPointOverflowError(
                    f"{what} holds {float(peak)!r}, outside the fixed-point range ±2^30 (or not finite), so "
                    "fixed-point rounding would wrap. Fix: for an initial state, pass a finite state of moderate "
                    "size; for weights, inputs or outputs holding NaN/inf, lower the learning rate, clip gradients "
                    "or check the input."
                )
