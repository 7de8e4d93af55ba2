"""Errors raised when exact arithmetic cannot be guaranteed."""

from __future__ import annotations


class FixedPointOverflowError(ArithmeticError):
    """A hidden, cell or gate value left the fixed-point range (or was NaN/inf): the result would wrap."""


class ReconstructionError(RuntimeError):
    """The reverse sweep did not reconstruct the forward states bit for bit."""


class FusedPathError(RuntimeError):
    """The fused path (``fused=True``) could not compile or run one of its ``torch.compile`` stages."""
