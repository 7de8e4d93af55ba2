"""Errors raised when exact arithmetic cannot be guaranteed."""

from __future__ import annotations


class FixedPointOverflowError(ArithmeticError):
    """A hidden, cell or gate value left the fixed-point range (or was NaN/inf): the result would wrap.

    Example::

        >>> import torch
        >>> from lightning_revrnn import RevGRU
        >>> RevGRU(3, 4)(torch.full((2, 1, 3), float("nan")))  # a NaN input: its pre-activations are NaN
        Traceback (most recent call last):
            ...
        lightning_revrnn.core.errors.FixedPointOverflowError: layer 0: input pre-activations holds nan, ...
    """


class ReconstructionError(RuntimeError):
    """The reverse sweep did not reconstruct the forward states bit for bit.

    Example::

        >>> import torch
        >>> from lightning_revrnn import RevGRU
        >>> rnn = RevGRU(3, 4)
        >>> out, h_n = rnn(torch.randn(6, 2, 3))
        >>> _ = rnn.last_window.buffers[0].word.data.add_(1)  # corrupt the saved buffer behind autograd's back
        >>> out.sum().backward()
        Traceback (most recent call last):
            ...
        lightning_revrnn.core.errors.ReconstructionError: Reverse sweep ...
    """


class FusedPathError(RuntimeError):
    """The fused path (``fused=True``) could not compile or run one of its ``torch.compile`` stages.

    Example::

        >>> import torch
        >>> from lightning_revrnn.fused.stages import CompiledStage
        >>> CompiledStage("demo", lambda x: x.no_such_attribute)(torch.ones(1))  # a stage that cannot compile
        Traceback (most recent call last):
            ...
        lightning_revrnn.core.errors.FusedPathError: The fused path's compiled stage 'demo' failed (...
    """
