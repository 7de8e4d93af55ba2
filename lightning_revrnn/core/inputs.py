"""Checks of what a reversible sequence module is given, each raising an error that names the problem and the fix."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_keep(keep: Tensor | None, x: Tensor, batch_first: bool) -> Tensor | None:
    """The keep mask as the sweep reads it, ``(T, B, 1)`` bool on ``x``'s device; None stays None."""
    if keep is None:
        return None
    layout = "(batch, time)" if batch_first else "(time, batch)"
    expected = tuple(x.shape[:2])
    if not isinstance(keep, Tensor):
        raise TypeError(f"keep must be a bool tensor {layout} or None, got {type(keep).__name__}.")
    if keep.dtype != torch.bool:
        raise ValueError(
            f"keep must be a bool tensor {layout} (True where an example takes the step), got dtype "
            f"{keep.dtype}. Fix: pass keep=lengths_mask.bool(), e.g. keep = steps[:, None] < lengths[None, :]."
        )
    if tuple(keep.shape) != expected:
        raise ValueError(
            f"keep must have the input's leading shape {layout} = {expected}, got {tuple(keep.shape)}. "
            f"Fix: one bool per step and example{', batch first' if batch_first else ', time first'}."
        )
    if keep.device != x.device:
        raise ValueError(f"keep is on {keep.device} but the input is on {x.device}. Fix: keep.to(x.device).")
    keep = keep.transpose(0, 1) if batch_first else keep
    return keep.detach().unsqueeze(-1)


def check_float32_parameters(module: nn.Module) -> None:
    """Raise unless every parameter of ``module`` is float32 (the cells compute in exact float32 fixed point)."""
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes != {torch.float32}:
        raise TypeError(
            f"{type(module).__name__} parameters must be float32 (the cells compute in exact float32 fixed "
            f"point), got {sorted(map(str, dtypes))}. Fix: keep the module in float32 (no .double(), "
            ".half() or .to(dtype)); with a Lightning Trainer use precision='32-true', 'bf16-mixed' or "
            "'16-mixed' (autocast runs the layers around it in low precision), not '64-true' or '*-true'."
        )
