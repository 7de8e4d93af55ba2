"""Dropout masks that cost no memory between forward and backward.

A DropConnect mask is as large as the hidden-to-hidden weights; keeping it as a float tensor from forward to
backward would cost more than the information buffer. :class:`SeededMask` keeps only a seed and redraws
the identical mask (same generator, same device) whenever the forward or the reverse sweep needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def locked_mask(shape: tuple[int, ...] | torch.Size, p: float, like: Tensor) -> Tensor | None:
    """One dropout mask for a whole window (kept with probability ``1 - p``, scaled by ``1/(1-p)``),
    on ``like``'s device; None when ``p`` is 0."""
    if p == 0.0:
        return None
    return like.new_empty(shape, dtype=torch.float32).bernoulli_(1.0 - p).div_(1.0 - p)


@dataclass(frozen=True)
class SeededMask:
    """A dropout mask (kept with probability ``1 - p``, scaled by ``1/(1-p)``) drawn from its own seed."""

    shape: tuple[int, ...]
    p: float
    seed: int
    device: torch.device

    @classmethod
    def sample(cls, shape: tuple[int, ...], p: float, device: torch.device) -> SeededMask:
        """A new mask whose seed comes from the global RNG (so ``torch.manual_seed`` reproduces it)."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return cls(tuple(shape), p, seed, torch.device(device))

    def materialize(self) -> Tensor:
        """The mask as a float32 tensor, bit-identical on every call."""
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        uniform = torch.rand(self.shape, generator=generator, device=self.device)  # 3x faster than bernoulli_ on CPU
        return (uniform >= self.p).to(torch.float32).div_(1.0 - self.p)
