"""The fused backend's integer stages as hand-written Triton kernels: one kernel per exact multiplication (or its
inverse) with the additive term and the float32 conversion, for CUDA.

Each kernel has the signature of the compiled stage it replaces (:meth:`~lightning_revrnn.fused.stages.Stages.
multiply_add`, :meth:`~lightning_revrnn.fused.stages.Stages.subtract_divide`) and computes the reference
arithmetic of :func:`~lightning_revrnn.core.fixed_point.reversible_multiply` / ``reversible_divide`` bit for
bit (``tests/fused/test_triton_kernels.py`` runs them on the CPU under ``TRITON_INTERPRET=1`` against the
reference). Integer ops are exact in any form; two details need care:

* Triton's ``//`` truncates toward zero. The multiplication divides the non-negative word, where truncation
  is floor division; the inverse divides ``h*`` of either sign, so its quotient is corrected to the floor
  (and the remainder to ``[0, z*)``).
* ``h* >> R_Z`` and ``h* & (2^R_Z - 1)`` on signed int64 are the arithmetic shift and the two's-complement low
  bits, as in PyTorch: floor division and the non-negative remainder by ``2^R_Z``.

The float32 value is ``float32(h*)·2^-R_H``: the int64 → float32 conversion is correctly rounded and the scaling
exact, so it equals :func:`~lightning_revrnn.core.fixed_point.to_float` bit for bit. The ``log2 z*`` of the
accounting is float32 math (to tolerance, as the compiled stage's).

Import this module only where Triton is wanted: with ``TRITON_INTERPRET=1`` set before the import the kernels
run on CPU tensors (tests), else on CUDA tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_revrnn.core.buffer import FLOOR, DrainSite, PopSite
from lightning_revrnn.core.fixed_point import R_H, R_Z

#: Elements per Triton program.
BLOCK = 1024


@triton.jit
def _multiply_add_kernel(
    h_ptr, z_ptr, word_ptr, add_ptr, log2_ptr,  # inputs (log2_ptr read only when LOGGED)
    h_out, h_float_out, word_out, log2_out,  # outputs, contiguous
    stack_ptr, depth_ptr, last,  # the drains' dense stack and depths, updated in place (when STORE)
    n_cols, numel, h_row, z_row, word_row, add_row,  # row strides (the last dimension is contiguous)
    R_Z: tl.constexpr, INV_SCALE: tl.constexpr, LOGGED: tl.constexpr, DRAIN: tl.constexpr,
    STORE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    row = i // n_cols  # i >= 0: truncation is floor division
    col = i - row * n_cols
    h = tl.load(h_ptr + row * h_row + col, mask=mask, other=0)
    z = tl.load(z_ptr + row * z_row + col, mask=mask, other=1)
    word = tl.load(word_ptr + row * word_row + col, mask=mask, other=0)
    add = tl.load(add_ptr + row * add_row + col, mask=mask, other=0)
    if DRAIN:  # InformationBuffer.begin_multiply: a unit at or above z*·2^32 moves its low 32 bits to its stack
        drains = word >= (z << 32)
        if STORE:
            depth = tl.load(depth_ptr + i, mask=mask, other=0)
            slot = tl.minimum(depth, last)
            tl.store(stack_ptr + slot * numel + i, word.to(tl.int32), mask=mask & drains)  # the low 32 bits
            tl.store(depth_ptr + i, depth + drains.to(tl.int64), mask=mask)
        word = tl.where(drains, word >> 32, word)
    word = (h & ((1 << R_Z) - 1)) + (word << R_Z)  # push h*'s low bits (word < 2^(63 - R_Z): no overflow)
    quotient = word // z  # word >= 0, z* >= 1: truncation is floor division
    h = (h >> R_Z) * z + (word - quotient * z) + add
    tl.store(h_out + i, h, mask=mask)
    tl.store(h_float_out + i, h.to(tl.float32) * INV_SCALE, mask=mask)
    tl.store(word_out + i, quotient, mask=mask)
    if LOGGED:
        log2 = tl.load(log2_ptr + i, mask=mask, other=0.0)
        tl.store(log2_out + i, log2 + tl.log2(z.to(tl.float32)).to(tl.float64), mask=mask)


@triton.jit
def _subtract_divide_kernel(
    h_ptr, add_ptr, z_ptr, word_ptr,
    h_out, h_float_out, word_out,
    stack_ptr, top_ptr, start_ptr,  # the compacted slots and each unit's top (updated in place) and start (when POP)
    n_cols, numel, h_row, add_row, z_row, word_row,
    R_Z: tl.constexpr, INV_SCALE: tl.constexpr, POP: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    row = i // n_cols
    col = i - row * n_cols
    h = tl.load(h_ptr + row * h_row + col, mask=mask, other=0)
    add = tl.load(add_ptr + row * add_row + col, mask=mask, other=0)
    z = tl.load(z_ptr + row * z_row + col, mask=mask, other=1)
    word = tl.load(word_ptr + row * word_row + col, mask=mask, other=0)
    h = h - add
    quotient = h // z  # truncated toward zero: corrected to the floor below
    remainder = h - quotient * z
    below = remainder < 0
    quotient = tl.where(below, quotient - 1, quotient)
    remainder = tl.where(below, remainder + z, remainder)
    word = word * z + remainder
    h = (word & ((1 << R_Z) - 1)) + (quotient << R_Z)
    word = word >> R_Z
    if POP:  # InformationBuffer.end_divide: below the floor with slots left, the unit had drained: pop one back
        top = tl.load(top_ptr + i, mask=mask, other=0)
        start = tl.load(start_ptr + i, mask=mask, other=0)
        drained = (word < FLOOR) & (top > start) & mask
        low = tl.load(stack_ptr + top, mask=drained, other=0).to(tl.uint32).to(tl.int64)  # the slot's 32 bits
        word = tl.where(drained, (word << 32) | low, word)
        tl.store(top_ptr + i, top - drained.to(tl.int64), mask=mask)
    tl.store(h_out + i, h, mask=mask)
    tl.store(h_float_out + i, h.to(tl.float32) * INV_SCALE, mask=mask)
    tl.store(word_out + i, word, mask=mask)


def _rows(*tensors: Tensor) -> list[int]:
    """The row strides of 2-D tensors whose last dimension is contiguous (slices of a wider tensor are)."""
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"expected 2-D tensors with a contiguous last dimension, got {tuple(t.stride())}")
    return [t.stride(0) for t in tensors]


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, BLOCK),)


def _empty(like: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous output of ``like``'s shape and device."""
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _drain_operands(h: Tensor, site: DrainSite | None) -> tuple[list[Any], dict[str, bool]]:
    """The drain arguments of :func:`_multiply_add_kernel` for ``site`` (None: no unit may drain yet)."""
    if site is None or site.stack is None or site.depth is None:
        return [h, h, 0], dict(DRAIN=site is not None, STORE=False)
    _contiguous(site.stack, site.depth)
    return [site.stack, site.depth, site.last], dict(DRAIN=True, STORE=True)


def _contiguous(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"expected a contiguous buffer tensor, got strides {tuple(t.stride())}")


def multiply_add(
    h: Tensor, z: Tensor, word: Tensor, add: Tensor, site: DrainSite | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``h*·z*/2^R_Z + add`` through the buffer word, one kernel: (new h*, its float32 value, new word). With
    ``site`` (:meth:`~lightning_revrnn.core.buffer.InformationBuffer.begin_kernel_multiply`) the units drain first,
    in the same kernel."""
    h_new, h_float, word_new = _empty(h, torch.int64), _empty(h, torch.float32), _empty(h, torch.int64)
    n = h.numel()
    drain, flags = _drain_operands(h, site)
    _multiply_add_kernel[_grid(n)](
        h, z, word, add, h, h_new, h_float, word_new, h, *drain, h.shape[1], n, *_rows(h, z, word, add),
        R_Z=R_Z, INV_SCALE=2.0**-R_H, LOGGED=False, **flags, BLOCK=BLOCK,
    )  # fmt: skip
    return h_new, h_float, word_new


def multiply_add_logged(
    h: Tensor, z: Tensor, word: Tensor, add: Tensor, log2_units: Tensor, site: DrainSite | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`multiply_add` that also adds ``log2 z*`` to ``log2_units`` (float64, contiguous), in the same kernel."""
    h_new, h_float, word_new = _empty(h, torch.int64), _empty(h, torch.float32), _empty(h, torch.int64)
    log2_new = _empty(h, torch.float64)
    n = h.numel()
    drain, flags = _drain_operands(h, site)
    _multiply_add_kernel[_grid(n)](
        h, z, word, add, log2_units.contiguous(), h_new, h_float, word_new, log2_new, *drain, h.shape[1], n,
        *_rows(h, z, word, add), R_Z=R_Z, INV_SCALE=2.0**-R_H, LOGGED=True, **flags, BLOCK=BLOCK,
    )  # fmt: skip
    return h_new, h_float, word_new, log2_new


def subtract_divide(
    h: Tensor, add: Tensor, z: Tensor, word: Tensor, site: PopSite | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`multiply_add`, one kernel: (old h*, its float32 value, old word). With ``site``
    (:meth:`~lightning_revrnn.core.buffer.InformationBuffer.begin_kernel_divide`) the units pop their drained
    slots back, in the same kernel."""
    h_old, h_float, word_old = _empty(h, torch.int64), _empty(h, torch.float32), _empty(h, torch.int64)
    n = h.numel()
    pop = [h, h, h] if site is None else [site.stack, site.top, site.start]
    if site is not None:
        _contiguous(site.top, site.start)
    _subtract_divide_kernel[_grid(n)](
        h, add, z, word, h_old, h_float, word_old, *pop, h.shape[1], n, *_rows(h, add, z, word),
        R_Z=R_Z, INV_SCALE=2.0**-R_H, POP=site is not None, FLOOR=FLOOR, BLOCK=BLOCK,
    )  # fmt: skip
    return h_old, h_float, word_old
