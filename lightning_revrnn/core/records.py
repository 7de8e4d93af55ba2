"""What one group's reverse half-step hands to its backward: named records, the same for every backend.

A record holds the float values of one group's update that its gradient needs (gates, the rounded forget
values as floats, the old own halves), recomputed by the reverse sweep from the exactly reconstructed state.
Every backend's ``half_reverse`` returns one and its ``step_backward`` reads it (see
:class:`~lightning_revrnn.core.backend.Backend`).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class GRURecord(NamedTuple):
    """One RevGRU group's update ``h ← z*·h + (1 − z*)·g`` (all ``(B, n)`` floats).

    ``zr``: ``σ([z; r])`` as one ``(B, 2n)`` block when the backend computed it so (the eager cells do;
    ``z`` and ``r`` are then views of it), else None.
    """

    other: Tensor  #: the other half the group read
    r_other: Tensor  #: ``r∘other``, the input of the candidate's hidden GEMM
    z: Tensor  #: update gate ``σ``
    r: Tensor  #: reset gate ``σ``
    g: Tensor  #: candidate ``tanh``
    z_used: Tensor  #: the rounded, limited forget value ``z*/2^R_Z`` (1 where the step is held)
    h_old: Tensor  #: the own half before the update
    zr: Tensor | None = None


class LSTMRecord(NamedTuple):
    """One RevLSTM group's update ``c ← f*·c + i·g``, ``h ← p*·h + o·tanh(c)`` (all ``(B, n)`` floats but
    ``sig``, ``(B, 4n)``)."""

    other: Tensor  #: the other half the group read
    sig: Tensor  #: ``σ([f; i; o; p])`` as one block
    g: Tensor  #: candidate ``tanh``
    f_used: Tensor  #: the rounded, limited ``f*/2^R_Z`` (1 without forgetting or where held)
    p_used: Tensor  #: the rounded, limited ``p*/2^R_Z``
    o_held: Tensor  #: the output gate, 0 where the step is held
    h_old: Tensor  #: the own ``h`` before the update
    c_old: Tensor  #: the own ``c`` before the update
    c_new: Tensor  #: the own ``c`` after the update


#: What any reverse half-step returns.
Record = GRURecord | LSTMRecord
