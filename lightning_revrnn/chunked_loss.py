"""A linear layer and summed cross-entropy computed a block of rows at a time, so that no ``rows × vocab``
logits tensor ever exists: the memory of the logits is bounded by a byte budget, not by the number of rows.

Two entry points, one arithmetic (:func:`_blockwise`):

* :func:`linear_cross_entropy` (autograd): equals ``F.cross_entropy(F.linear(x, weight, bias).float(), targets,
  ignore_index=..., reduction="sum")`` in value and gradients (to float32 rounding). Its forward walks the
  ``N`` rows in blocks of :func:`rows_per_block` rows and keeps only the log-sum-exp of each row (``N``
  floats); its backward recomputes each block's logits, turns them in place into their gradient and writes
  the input's rows and the weight/bias gradients block by block.
* :func:`linear_cross_entropy_accumulate` (the reverse sweep, which runs a head only to differentiate it at
  once): one pass that forms each block's loss and gradient together (one logits GEMM per block instead of
  two) and *adds* the weight and bias gradients, times a scale, into accumulators the caller owns, so no
  ``V × H`` gradient temporary exists either.

Memory: per block one ``rows × V`` float32 tensor (the logits, turned into probabilities and then into their
gradient in place), plus, under autocast to a lower precision, the GEMM's output before its float32 copy: 2
such tensors then (:func:`live_blocks`), 1 in float32, so a block has as many rows as fit the budget.
Autocast: the logits GEMM follows the caller's autocast (bf16 under ``precision="bf16-mixed"``, as the
``nn.Linear`` it replaces; the backward re-enters the forward's state, so the recomputed logits are the
forward's); the softmax, the loss and the gradient GEMMs run in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_revrnn.core.numerics import AutocastState

#: Default byte budget of the row-block temporaries (see :func:`rows_per_block`): 4 MiB, i.e. 56 float32 rows of
#: an 18,726-word vocabulary (Multi30K German) or 104 of PTB's 10,000: GEMMs that run near full speed. A larger
#: budget runs faster and raises the step's peak (docs/benchmarks.md has the trade-off measured).
DEFAULT_BLOCK_BYTES = 4 * 2**20


def live_blocks(device_type: str) -> int:
    """``rows × V`` tensors a block has alive at once: the float32 logits (turned into the gradient in place) and,
    under autocast to a lower precision, the GEMM's output before its float32 copy."""
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != torch.float32:
        return 2
    return 1


def rows_per_block(vocab: int, block_bytes: int, live: int = 1, element_bytes: int = 4) -> int:
    """Rows per block so that a block's ``live`` ``rows × vocab`` temporaries (:func:`live_blocks`) fit
    ``block_bytes`` (at least one row: a budget below that gives one-row blocks)."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}. Fix: a budget in bytes, e.g. 8 * 2**20.")
    return max(1, block_bytes // (live * vocab * element_bytes))


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int = -100,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Tensor:
    """The cross-entropy of ``x @ weight.T + bias`` against ``targets``, summed over the rows whose target is
    not ``ignore_index``: a float32 scalar, differentiable in ``x``, ``weight`` and ``bias``.

    Args:
        x: inputs ``(N, H)``.
        weight: ``(V, H)``, as ``nn.Linear(H, V).weight``.
        bias: ``(V,)`` or None.
        targets: class ids ``(N,)`` in ``[0, V)``, or ``ignore_index`` (no loss, no gradient).
        ignore_index: the target value of ignored rows.
        block_bytes: budget of the row-block temporaries (:func:`rows_per_block`).
    """
    check_shapes(x, weight, targets)
    rows = rows_per_block(weight.shape[0], block_bytes, live_blocks(x.device.type))
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not wants_grad:  # evaluation, the sweep's forward: the value only, nothing kept
        return _blockwise(x, weight, bias, targets, ignore_index, rows)[0]
    loss: Tensor = LinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, rows)  # type: ignore[no-untyped-call]  # Function.apply is unannotated
    return loss


def linear_cross_entropy_accumulate(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    scale: Tensor | float,
    weight_grad: Tensor | None,
    bias_grad: Tensor | None,
    ignore_index: int = -100,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[Tensor, Tensor]:
    """One blockwise pass for the loss of :func:`linear_cross_entropy` and its gradients times ``scale``:
    returns ``(loss, d_x)`` (``d_x``: float32 ``(N, H)``) and adds the weight's and bias's gradients into
    ``weight_grad`` ``(V, H)`` and ``bias_grad`` ``(V,)`` (float32 accumulators; None: not wanted). No graph is
    recorded."""
    check_shapes(x, weight, targets)
    rows = rows_per_block(weight.shape[0], block_bytes, live_blocks(x.device.type))
    sinks = GradientSinks(scale, torch.empty(x.shape, dtype=torch.float32, device=x.device), weight_grad, bias_grad)
    loss, _ = _blockwise(
        x.detach(), weight.detach(), None if bias is None else bias.detach(), targets, ignore_index, rows, sinks=sinks
    )
    assert sinks.x is not None
    return loss, sinks.x


def linear_cross_entropy_into(
    x: Tensor,
    linear: nn.Linear,
    targets: Tensor,
    scale: Tensor | float,
    accumulators: Sequence[tuple[Tensor, Tensor]],
    ignore_index: int = -100,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Tensor:
    """:func:`linear_cross_entropy_accumulate` for an ``nn.Linear`` inside the reverse sweep: its weight and bias
    gradients go into their accumulators among the sweep's ``(tensor, accumulator)`` pairs (matched by identity;
    a parameter not among them gets none), and the gradient of ``x`` comes back in ``x``'s dtype."""
    own = {id(t): acc for t, acc in accumulators}
    bias = linear.bias
    _, d_x = linear_cross_entropy_accumulate(
        x,
        linear.weight,
        bias,
        targets,
        scale,
        own.get(id(linear.weight)),
        None if bias is None else own.get(id(bias)),
        ignore_index,
        block_bytes,
    )
    return d_x.to(x.dtype)


def check_shapes(x: Tensor, weight: Tensor, targets: Tensor) -> None:
    """Raise on inputs that are not ``x (N, H)``, ``weight (V, H)``, ``targets (N,)``, naming the fix."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy takes x (N, H) and weight (V, H), got {tuple(x.shape)} and {tuple(weight.shape)}. "
            "Fix: flatten the leading dimensions of x (x.flatten(0, -2)) and pass nn.Linear's weight."
        )
    if targets.shape != x.shape[:1]:
        raise ValueError(
            f"targets must be (N,) = {tuple(x.shape[:1])} for x {tuple(x.shape)}, got {tuple(targets.shape)}. "
            "Fix: flatten the targets like x."
        )


@dataclass
class GradientSinks:
    """Where a gradient pass writes (every gradient times ``scale``): ``x``, the input's rows (float32
    ``(N, H)``, overwritten), and the accumulators ``weight`` ``(V, H)`` and ``bias`` ``(V,)`` (added to); None:
    not wanted."""

    scale: Tensor | float
    x: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


class LinearCrossEntropy(torch.autograd.Function):
    """``apply(x, weight, bias, targets, ignore_index, rows)``: the summed loss; saves the inputs and each
    row's log-sum-exp, and recomputes the logits block by block in backward. Use :func:`linear_cross_entropy`."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int, rows: int
    ) -> Tensor:
        loss, lse = _blockwise(x, weight, bias, targets, ignore_index, rows)
        ctx.save_for_backward(x, weight, bias, targets, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        ctx.autocast = AutocastState.capture(x.device)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, targets, lse = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        f32 = dict(dtype=torch.float32, device=x.device)
        sinks = GradientSinks(
            grad_loss.float(),
            torch.empty(x.shape, **f32) if want_x else None,
            torch.zeros(weight.shape, **f32) if want_w else None,
            torch.zeros(weight.shape[0], **f32) if want_b and bias is not None else None,
        )
        with ctx.autocast.enter():
            _blockwise(x, weight, bias, targets, ctx.ignore_index, ctx.rows, lse, sinks)
        dx, dw, db = sinks.x, sinks.weight, sinks.bias
        return (
            None if dx is None else dx.to(x.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(weight.dtype),
            None,
            None,
            None,
        )


@torch.no_grad()
def _blockwise(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    rows: int,
    lse: Tensor | None = None,
    sinks: GradientSinks | None = None,
) -> tuple[Tensor, Tensor]:
    """The summed loss and every row's log-sum-exp ``(N,)``, a block of ``rows`` rows at a time. With
    ``sinks``, each block's gradients go there too; with ``lse`` (a backward) the row statistics are taken
    from it instead of computed (the loss returned is then 0: not needed)."""
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    lse_out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device) if lse is None else lse
    for start in range(0, x.shape[0], rows):
        block = slice(start, min(start + rows, x.shape[0]))
        keep = targets[block] != ignore_index
        safe = torch.where(keep, targets[block], 0)[:, None]
        logits = _logits(x[block], weight, bias)
        if lse is None:
            shift = logits.amax(1, keepdim=True)
            target_logit = logits.gather(1, safe)[:, 0]
            probs = logits.sub_(shift).exp_()  # the block's one rows × V tensor, in place from here on
            norm = probs.sum(1, keepdim=True)
            lse_out[block] = norm[:, 0].log() + shift[:, 0]
            total += torch.where(keep, lse_out[block] - target_logit, 0.0).sum()
            if sinks is None:
                del logits, probs
                continue
            probs.div_(norm)
        else:
            probs = logits.sub_(lse[block, None]).exp_()
        assert sinks is not None
        _block_gradients(probs, safe, keep, x[block], weight, sinks, block)
        del logits, probs  # before the next block's GEMM: one block alive at a time
    return total, lse_out


def _logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A block's float32 logits ``(rows, V)`` (the GEMM under the caller's autocast)."""
    logits = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    return logits.float()


def _block_gradients(
    probs: Tensor, safe: Tensor, keep: Tensor, x: Tensor, weight: Tensor, sinks: GradientSinks, block: slice
) -> None:
    """Turn a block's softmax ``probs`` into the gradient of its logits (in place: minus the targets' one-hot,
    zero on ignored rows, times the scale) and write / add its share of each gradient into ``sinks``."""
    d_logits = probs.scatter_add_(1, safe, torch.full(safe.shape, -1.0, dtype=probs.dtype, device=probs.device))
    d_logits.mul_(keep[:, None].to(probs.dtype) * sinks.scale)
    with torch.autocast(x.device.type, enabled=False):
        if sinks.x is not None:
            torch.mm(d_logits, weight.float(), out=sinks.x[block])
        if sinks.weight is not None:
            sinks.weight.addmm_(d_logits.t(), x.float())
        if sinks.bias is not None:
            sinks.bias += d_logits.sum(0)
