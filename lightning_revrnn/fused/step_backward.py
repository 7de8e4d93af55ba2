"""The fused path's written-out backward of one step, as pure functions compiled into one stage per cell type.

The same equations as the eager cells' ``half_backward`` (:mod:`lightning_revrnn.core.cells`), read from the
same named records (:mod:`lightning_revrnn.core.records`; the fused RevGRU record holds ``z`` and ``r`` as
tensors of their own and no ``zr`` block, see :func:`~lightning_revrnn.core.gates.gru_gates_split`).
:func:`step_backward` runs both groups of a step (group 2 first, as the cells' ``backward_step``) and first
adds the step's output gradient into the state gradient, so a whole step's backward is one compiled graph:
its GEMMs stay GEMMs (extern kernels), the elementwise work around them fuses into a few loops.

Nothing here feeds rounding: these are gradients, compared with the eager backward to a tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_revrnn.core.cell_base import add_output_gradient
from lightning_revrnn.core.gates import masked
from lightning_revrnn.core.records import GRURecord, LSTMRecord, Record

#: One group's backward: ``(w, record, d_new own halves, keep) -> (d_old own halves, d_pre (B, rows), d_other)``.
HalfBackward = Callable[[Tensor, Record, list[Tensor], "Tensor | None"], tuple[list[Tensor], Tensor, Tensor]]


def gru_half_backward(
    w: Tensor, record: Record, d_new: list[Tensor], keep: Tensor | None, forget_slope: float, forgets: bool
) -> tuple[list[Tensor], Tensor, Tensor]:
    """A RevGRU group's gradients (of the old h, of the gate pre-activations ``(B, 3n)``, of the other half):
    ``h_new = zs·h_old + (1 − zs)·g`` with ``zs`` the rounded limited ``z`` straight through (no forgetting:
    ``h_new = h_old + (1 − z)·g``)."""
    assert isinstance(record, GRURecord)
    other, z, r, g, zs, h_old = record.other, record.z, record.r, record.g, record.z_used, record.h_old
    n = other.shape[1]
    (d_h,) = d_new
    if forgets:
        d_z = masked(d_h * (h_old - g), keep) * forget_slope
        d_g = d_h * (1.0 - zs)  # 0 at masked rows (zs = 1 there)
    else:
        d_z = -masked(d_h * g, keep)
        d_g = masked(d_h * (1.0 - z), keep)
    d_pre_g = d_g * (1.0 - g * g)
    d_r_other = d_pre_g @ w[2 * n :]
    d_pre_zr = torch.cat([d_z * z * (1.0 - z), d_r_other * other * r * (1.0 - r)], 1)
    d_other = torch.addmm(d_r_other * r, d_pre_zr, w[: 2 * n])
    return [d_h * zs], torch.cat([d_pre_zr, d_pre_g], 1), d_other


def lstm_half_backward(
    w: Tensor, record: Record, d_new: list[Tensor], keep: Tensor | None, forget_slope: float, forgets: bool
) -> tuple[list[Tensor], Tensor, Tensor]:
    """A RevLSTM group's gradients (of the old h and c, of the gate pre-activations ``(B, 5n)``, of the other
    half): ``h_new = ps·h_old + o·tanh(c_new)``, ``c_new = fs·c_old + i·g`` (``fs = ps = 1`` without
    forgetting, where ``f`` and ``p`` get no gradient)."""
    assert isinstance(record, LSTMRecord)
    other, sig, g, fs, ps, o_held, h_old, c_old, c_new = record
    f, i, o, p = sig.split(other.shape[1], 1)
    d_h, d_c = d_new
    slope = forget_slope if forgets else 0.0
    tanh_c = torch.tanh(c_new)
    d_c = d_c + d_h * o_held * (1.0 - tanh_c * tanh_c)
    d_pre = torch.cat(
        [
            d_c * c_old * f * (1.0 - f) * slope,
            d_c * g * i * (1.0 - i),
            d_h * tanh_c * o * (1.0 - o),
            d_h * h_old * p * (1.0 - p) * slope,
            d_c * i * (1.0 - g * g),
        ],
        1,
    )
    d_pre = masked(d_pre, keep)
    return [d_h * ps, d_c * fs], d_pre, d_pre @ w


def step_backward(
    half_backward: HalfBackward,
    halves_per_group: int,
    w: Sequence[Tensor],
    records: Sequence[Record],
    d_state: list[Tensor],
    d_output: Tensor,
    keep: Tensor | None,
) -> tuple[list[Tensor], Tensor]:
    """One step's backward: (the gradient of the state before the step, of the step's input pre-activations
    ``(B, 2·rows)``) from the gradient of the state after it and of the step's output."""
    grads = add_output_gradient(d_state, d_output)
    d_pre: list[Tensor] = [grads[0], grads[0]]
    for g in (1, 0):
        idx = [g + 2 * j for j in range(halves_per_group)]
        d_old, d_pre[g], d_other = half_backward(w[g], records[g], [grads[i] for i in idx], keep)
        for i, d in zip(idx, d_old):
            grads[i] = d
        grads[1 - g] = grads[1 - g] + d_other
    return grads, torch.cat(d_pre, 1)
