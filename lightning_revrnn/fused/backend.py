"""The fused backend: the cells' exact half-steps as a few compiled stages (:mod:`lightning_revrnn.fused.stages`).

It computes the equations of :mod:`lightning_revrnn.core.cells` (the reference backend) and returns the same
named records; the tests check it against the reference (integers bit for bit, floats to tolerance). It runs
only where no autograd records (the forward of ``mode="reverse"``, evaluation, the reverse sweep).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from lightning_revrnn.core.backend import Backend
from lightning_revrnn.core.buffer import DrainSite, InformationBuffer
from lightning_revrnn.core.cell_base import Halves, ReversibleCell, restore_units, store_units, unbuffered
from lightning_revrnn.core.fixed_point import to_float
from lightning_revrnn.core.records import GRURecord, LSTMRecord, Record
from lightning_revrnn.fused.stages import StageCounter, Stages


class FusedBackend(Backend):
    """The exact half-steps as compiled stages: per group a gate stage (floats around the GEMMs), an integer
    stage per multiplication (through the buffer word), and per step one backward stage.

    On CUDA the integer stages are the hand-written Triton kernels of :mod:`lightning_revrnn.fused.triton_kernels`
    (one kernel each, the buffer's drains or pops inside it, no compiled-function guards to evaluate per call);
    elsewhere they are compiled stages, with the drains and pops as ATen ops around them. Both compute the
    reference's integers bit for bit, so the choice changes no result.

    Args:
        counter: count every stage call and the kernels it ran (benchmarks; see
            :class:`~lightning_revrnn.fused.stages.StageCounter`).
        triton: run the integer stages as Triton kernels: ``None`` on CUDA when Triton imports, ``True``
            everywhere (on the CPU only under ``TRITON_INTERPRET=1``: the tests), ``False`` never.

    Example::

        >>> from lightning_revrnn import RevGRU
        >>> rnn = RevGRU(4, 8, fused=True)  # uses the shared default FusedBackend where no autograd records
        >>> rnn.fused
        True
    """

    name = "fused"

    def __init__(self, counter: StageCounter | None = None, triton: bool | None = None) -> None:
        self.stages = Stages(counter)
        self.triton = triton

    # ------------------------------------------------------------------------------ integer stages
    def _uses_triton(self, device: torch.device) -> bool:
        if self.triton is None:
            return device.type == "cuda" and _triton_installed()
        return self.triton

    def _integer_stage(self, name: str, device: torch.device) -> Callable[..., Any]:
        """The integer stage ``name`` (``multiply_add``, ``multiply_add_logged``, ``subtract_divide``) for
        tensors on ``device``."""
        if not self._uses_triton(device):
            return self.stages.get(name)
        kernel: Callable[..., Any] = getattr(_triton_kernels(), name)
        counter = self.stages.counter
        if counter is None:
            return kernel

        def counted(*args: Any) -> Any:
            counter.calls[name] += 1
            counter.kernels[name] += 1
            return kernel(*args)

        return counted

    # ------------------------------------------------------------------------------------ buffer
    def _apply(self, buf: InformationBuffer, h: Tensor, z: Tensor | None, add: Tensor) -> tuple[Tensor, Tensor]:
        """``h*·z*/2^R_Z + add`` through the buffer (``h* + add`` without forgetting, ``z`` None): the new int
        half and its float32 value."""
        if z is None:
            return self.stages.add_term()(h, add)  # type: ignore[no-any-return]
        # a Triton kernel drains the units itself; before a compiled stage the buffer drains them (ATen ops)
        drain: list[DrainSite | None] = []
        if self._uses_triton(h.device):
            word, site = buf.begin_kernel_multiply()
            drain.append(site)
        else:
            word = buf.begin_multiply(z)
        if buf.retain:
            log2 = buf.log2_z_units
            if log2 is None:
                log2 = torch.zeros(word.shape, dtype=torch.float64, device=word.device)
            stage = self._integer_stage("multiply_add_logged", h.device)
            h, h_f, word, buf.log2_z_units = stage(h, z, word, add, log2, *drain)
        else:
            h, h_f, word = self._integer_stage("multiply_add", h.device)(h, z, word, add, *drain)
        buf.end_multiply(word)
        return h, h_f

    def _undo(self, buf: InformationBuffer, h: Tensor, z: Tensor | None, add: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`_apply`: the old int half and its float32 value."""
        if z is None:
            return self.stages.subtract_term()(h, add)  # type: ignore[no-any-return]
        stage = self._integer_stage("subtract_divide", h.device)
        if self._uses_triton(h.device):  # the kernel pops the slots itself
            word, site = buf.begin_kernel_divide()
            h, h_f, word = stage(h, add, z, word, site)
            buf.end_kernel_divide(word)
        else:
            h, h_f, word = stage(h, add, z, buf.begin_divide())
            buf.end_divide(word)
        return h, h_f

    # ------------------------------------------------------------------------------------ steps
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
        if cell.kind == "gru":
            *_, zq, zs, add, add_fixed = self.stages.gru_gates(cell.max_forget_bits, cell.forgets)(w, xp, other, keep)
            h, h_f = self._apply(buf, own[0], unbuffered(zq, stored), add_fixed)
            if stored:
                h = store_units(h, stored, zs * own_f[0] + add)
                h_f = to_float(h)
            return [h], [h_f]
        h, c = own
        *_, fq, pq, _, ps, _, add_c_fixed, o = self.stages.lstm_gates(cell.max_forget_bits, cell.forgets)(
            w, xp, other, keep
        )
        c, c_f = self._apply(buf, c, fq, add_c_fixed)
        add_h, add_h_fixed = self.stages.lstm_h_term()(o, c_f)
        h, h_f = self._apply(buf, h, unbuffered(pq, stored), add_h_fixed)
        if stored:
            h = store_units(h, stored, ps * own_f[0] + add_h)
            h_f = to_float(h)
        return [h, c], [h_f, c_f]

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
        stored = 0 if stored_old is None else stored_old.shape[1]
        if cell.kind == "gru":
            z, r, g, r_other, zq, zs, _, add_fixed = self.stages.gru_gates(cell.max_forget_bits, cell.forgets)(
                w, xp, other, keep
            )
            h, h_f = self._undo(buf, own[0], unbuffered(zq, stored), add_fixed)
            if stored_old is not None:
                h = restore_units(h, stored_old)
                h_f = to_float(h)
            return [h], GRURecord(other, r_other, z, r, g, zs, h_f)
        h, c = own
        sig, g, fq, pq, fs, ps, _, add_c_fixed, o_held = self.stages.lstm_gates(cell.max_forget_bits, cell.forgets)(
            w, xp, other, keep
        )
        c_new = own_f[1]
        _, add_h_fixed = self.stages.lstm_h_term()(o_held, c_new)
        h, h_f = self._undo(buf, h, unbuffered(pq, stored), add_h_fixed)
        if stored_old is not None:
            h = restore_units(h, stored_old)
            h_f = to_float(h)
        c, c_f = self._undo(buf, c, fq, add_c_fixed)
        return [h, c], LSTMRecord(other, sig, g, fs, ps, o_held, h_f, c_f, c_new)

    def step_backward(
        self,
        cell: ReversibleCell,
        w: list[Tensor],
        records: list[Record],
        d_state: list[Tensor],
        d_output: Tensor,
        keep: Tensor | None,
    ) -> tuple[list[Tensor], Tensor]:
        stage = self.stages.step_backward(cell.kind, cell.forget_slope, cell.forgets)
        return stage(w, records, d_state, d_output, keep)  # type: ignore[no-any-return]


@functools.cache
def _triton_installed() -> bool:
    """Whether Triton can be imported (looked up once: the answer is asked per multiplication)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_kernels() -> ModuleType:
    """:mod:`lightning_revrnn.fused.triton_kernels`, imported on first use (it imports Triton)."""
    return importlib.import_module("lightning_revrnn.fused.triton_kernels")


@functools.cache
def default_backend() -> FusedBackend:
    """The fused backend every module with ``fused=True`` shares (one set of compiled stages per process)."""
    return FusedBackend()
