"""The seam between the time loops and the arithmetic of one step: a :class:`Backend`.

The forward loop and the reverse sweep (:mod:`lightning_revrnn.core.forward`, :mod:`lightning_revrnn.core.sweep`)
never compute a gate themselves: they ask a backend for one group's exact half-step forward, its reverse
(which returns a named record, :mod:`lightning_revrnn.core.records`) and a whole step's backward from the two
records. The backend is chosen once per window (:func:`backend_for`), never per step.

* :class:`EagerBackend` runs the cells' own equations (:mod:`lightning_revrnn.core.cells`): the reference,
  differentiable (``mode="store"`` trains through it), the CPU default.
* ``FusedBackend`` (:mod:`lightning_revrnn.fused`) runs the same equations as a few compiled kernels and is
  tested against the reference. It runs only where no autograd records; ``fused="auto"`` (the default) uses it
  on CUDA.

A backend must keep reconstruction exact: every float that feeds rounding in a half-step's reverse must be
computed by the same code, on the same shapes, as in its forward.
"""

from __future__ import annotations

import importlib
import warnings
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

from lightning_revrnn.core.buffer import InformationBuffer
from lightning_revrnn.core.cell_base import Halves, ReversibleCell
from lightning_revrnn.core.records import Record


class Backend(ABC):
    """How a cell's exact half-steps and a step's backward are computed; a step forward or in reverse is two
    half-steps (:meth:`forward_step`, :meth:`reverse_step`), the same for every backend.

    Every method takes the cell (its kind, sizes, forget limit) and tensors only; a backend holds no
    per-window state. ``w``: the group's hidden weights ``(rows, H/2)``; ``xp``: its input pre-activations
    ``(B, rows)``; ``other``: the other half (float); ``own``/``own_f``: the group's own int halves and their
    float values; ``keep``: ``(B, 1)`` bool or None; ``stored``/``stored_old``: stored units of ``h1``.

    A sequence module takes a backend instance as ``fused=`` (:func:`backend_for` runs it where no autograd
    records: the forward of ``mode="reverse"`` training, its reverse sweep, evaluation). Subclass
    :class:`EagerBackend` to wrap the reference, as benchmarks do to count the work.

    Example::

        >>> import torch
        >>> from lightning_revrnn import RevGRU
        >>> class CountingBackend(EagerBackend):  # the reference arithmetic, counting half-steps forward
        ...     name = "counting"
        ...     def __init__(self) -> None:
        ...         self.half_steps = 0
        ...     def half_forward(self, cell, *args):
        ...         self.half_steps += 1
        ...         return super().half_forward(cell, *args)
        >>> backend = CountingBackend()
        >>> rnn = RevGRU(3, 4, fused=backend)
        >>> out, h_n = rnn(torch.randn(5, 2, 3))  # reverse-mode training: the forward runs on the backend
        >>> backend.half_steps  # 5 steps x 2 groups
        10
        >>> rnn.mode = "store"  # autograd records the forward: the reference (EagerBackend) runs it instead
        >>> out, h_n = rnn(torch.randn(5, 2, 3))
        >>> backend.half_steps
        10
    """

    #: A short name for messages and benchmarks.
    name: str

    @abstractmethod
    def half_forward(
        self,
        cell: ReversibleCell,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored: int,
    ) -> Halves:
        """One group's update: its new int halves and their float values."""

    @abstractmethod
    def half_reverse(
        self,
        cell: ReversibleCell,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored_old: Tensor | None,
    ) -> tuple[list[Tensor], Record]:
        """Undo one group's update exactly: its old int halves, and the record its backward reads."""

    @abstractmethod
    def step_backward(
        self,
        cell: ReversibleCell,
        w: list[Tensor],
        records: list[Record],
        d_state: list[Tensor],
        d_output: Tensor,
        keep: Tensor | None,
    ) -> tuple[list[Tensor], Tensor]:
        """One step's gradients: of the state before it (from ``d_state`` after it plus the step's output
        gradient ``d_output``) and of its input pre-activations ``(B, 2·rows)``."""

    # ------------------------------------------------------------------ a step: two half-steps
    def forward_step(
        self,
        cell: ReversibleCell,
        w: list[Tensor],
        xp: Tensor,
        state: list[Tensor],
        state_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None = None,
        stored: int = 0,
    ) -> Halves:
        """One exact step: group 1 from ``h2``, then group 2 from the new ``h1``. Rows where ``keep``
        (``(B, 1)`` bool, None: all) is False keep their state and buffer words bit for bit. The first
        ``stored`` units of ``h1`` are stored units (:func:`~lightning_revrnn.core.cell_base.store_units`)."""
        state, state_f = list(state), list(state_f)
        xps = xp.split(cell.hidden_rows, -1)
        for g in (0, 1):
            idx = cell.own(g)
            new, new_f = self.half_forward(
                cell,
                w[g],
                xps[g],
                state_f[1 - g],
                [state[i] for i in idx],
                [state_f[i] for i in idx],
                buf,
                keep,
                stored if g == 0 else 0,
            )
            for i, v, f in zip(idx, new, new_f):
                state[i], state_f[i] = v, f
        return state, state_f

    def reverse_step(
        self,
        cell: ReversibleCell,
        w: list[Tensor],
        xp: Tensor,
        state: list[Tensor],
        floats: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None = None,
        stored_old: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Record]]:
        """Reconstruct the state before a step exactly: group 2 (which read the new ``h1``), then group 1
        (which read the restored ``h2``). ``floats``: the float32 values of ``state``'s halves. Returns the
        int halves before the step and the two groups' records (group 1 first); the floats before the step
        are ``cell.floats_before(records)``. ``stored_old``: the stored units of ``h1`` before the step."""
        old = list(state)
        xps = xp.split(cell.hidden_rows, -1)
        records: list[Record] = []
        other = floats[0]  # group 2 read h1 after the step
        for g in (1, 0):
            idx = cell.own(g)
            own, own_f = [old[i] for i in idx], [floats[i] for i in idx]
            prev, record = self.half_reverse(
                cell, w[g], xps[g], other, own, own_f, buf, keep, stored_old if g == 0 else None
            )
            records.insert(0, record)
            for i, v in zip(idx, prev):
                old[i] = v
            other = record.h_old  # group 1 read h2 before the step
        return old, records


class EagerBackend(Backend):
    """The reference: the cells' own equations in eager PyTorch (differentiable, any device).

    Example::

        >>> cpu = torch.device("cpu")
        >>> backend_for(fused=True, differentiable=True, device=cpu).name  # autograd records: only the reference
        'eager'
        >>> backend_for(fused="auto", differentiable=False, device=cpu).name  # "auto": the reference off CUDA
        'eager'
    """

    name = "eager"

    def half_forward(
        self,
        cell: ReversibleCell,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored: int,
    ) -> Halves:
        return cell.half_forward(w, xp, other, own, own_f, buf, keep, stored)

    def half_reverse(
        self,
        cell: ReversibleCell,
        w: Tensor,
        xp: Tensor,
        other: Tensor,
        own: list[Tensor],
        own_f: list[Tensor],
        buf: InformationBuffer,
        keep: Tensor | None,
        stored_old: Tensor | None,
    ) -> tuple[list[Tensor], Record]:
        return cell.half_reverse(w, xp, other, own, own_f, buf, keep, stored_old)

    def step_backward(
        self,
        cell: ReversibleCell,
        w: list[Tensor],
        records: list[Record],
        d_state: list[Tensor],
        d_output: Tensor,
        keep: Tensor | None,
    ) -> tuple[list[Tensor], Tensor]:
        return cell.backward_step(w, records, d_state, d_output, keep)


EAGER = EagerBackend()


#: What a module's ``fused`` argument takes: ``"auto"`` (the fused backend on CUDA, the reference elsewhere),
#: True/False, or a backend instance (benchmarks inject a counting one).
Fused = bool | Literal["auto"] | Backend
#: The device types on which ``fused="auto"`` runs the fused backend: where launches, not arithmetic, set a step's
#: time. On the CPU the eager reference is as fast (docs/benchmarks.md) and needs no compiler.
AUTO_FUSED_DEVICES = ("cuda",)


def check_fused(value: object) -> Fused:
    """A module's ``fused`` argument, checked."""
    if not isinstance(value, (bool, Backend)) and value != "auto":
        raise TypeError(f"fused must be True, False or 'auto', got {value!r}.")
    if value is True and not hasattr(torch, "compile"):
        raise RuntimeError(
            f"fused=True needs torch.compile, which torch {torch.__version__} does not have. Fix: fused=False "
            "(the eager path computes the same exact algorithm), or install torch >= 2.1."
        )
    return value


def warn_fallback(owner: str, failure: Exception) -> None:
    """The one warning of a ``fused="auto"`` module whose fused backend failed (it runs the reference from then)."""
    warnings.warn(
        f"{owner}(fused='auto'): the fused backend failed, so this module runs the eager reference backend from "
        f"now on (exact, slower on a GPU). Why: {failure} To silence this, build the module with fused=False; to "
        "get the fast path back, fix the cause and set module.fused = 'auto'.",
        RuntimeWarning,
        stacklevel=4,
    )


def backend_for(fused: Fused, differentiable: bool, device: torch.device) -> Backend:
    """The backend for one window on ``device``: the reference when ``fused`` is False (or ``"auto"`` off CUDA)
    or autograd must record the window (``differentiable``: ``mode="store"`` training; the reference is the only
    differentiable backend), else ``fused`` itself when it is a backend, or the fused backend.

    The fused backend is imported here, on first use, so that importing the core never imports it."""
    if fused == "auto":
        fused = device.type in AUTO_FUSED_DEVICES
    if not fused or differentiable:
        return EAGER
    if isinstance(fused, Backend):
        return fused
    module = importlib.import_module("lightning_revrnn.fused")
    return module.default_backend()  # type: ignore[no-any-return]  # a FusedBackend
