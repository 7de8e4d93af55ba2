"""What the reverse sweep runs besides the cells: a per-step input :class:`StepStem` and an output
:class:`StepHead`, each called a chunk of :data:`CHUNK` steps at a time, in forward and again in the reverse
sweep, so no ``T × B × features`` input and no ``T × B × vocab`` output lives from forward to backward.

A head or stem holds no per-batch state: what it reads for one batch (targets, dropout masks, an attention
memory) is bound explicitly, e.g. ``rnn(tokens, head=head.bind(targets), stem=stem.bind())``, and the bound
object is what the sweep calls, in forward and in backward alike.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def add_gradients(targets: Sequence[tuple[Tensor, Tensor]], grads: Sequence[Tensor | None]) -> None:
    """Add each gradient (dense or sparse) into its ``(tensor, accumulator)`` target's accumulator; None: the
    target was not reached."""
    for (_, acc), grad in zip(targets, grads):
        if grad is not None:
            acc.add_(grad)


def lookup_gradient(weight: Tensor, indices: Tensor, rows: Tensor) -> Tensor:
    """The gradient of a lookup table ``weight`` ``(V, E)`` from its looked-up rows' gradients ``rows``
    ``(*indices.shape, E)``: each row added into its index's (the form of ``context_gradient`` for an
    accumulator kept per looked-up row)."""
    dense = torch.zeros_like(weight, dtype=rows.dtype)
    return dense.index_add_(0, indices.reshape(-1), rows.reshape(-1, rows.shape[-1]))


class StepHead(nn.Module, metaclass=ABCMeta):
    """An output head run inside the sweep, e.g. decoder + cross-entropy, a chunk of steps at a time.

    Subclasses implement :meth:`forward`: given the top layer's outputs ``(C, B, H)`` for steps
    ``start .. start+C-1`` of the window, return the scalar sum of the head over those steps (it must be a
    sum over steps: the sequence module returns the total over the window). The head only ever sees
    ``CHUNK`` steps at once, so no ``T × batch × vocab`` tensor exists. In ``mode="reverse"`` it runs in
    forward (for the value), then once per chunk in the reverse sweep (:meth:`accumulate_grads`: the
    gradient flowing into the RNN and its own parameters' and context's gradients, in one call). What it
    reads for one batch (targets, a dropout mask) it receives when it is built or bound for that batch
    (``head.bind(targets)`` returning a head), never as attributes set on a shared module.

    With a keep mask (padding) the head still receives every step; at a masked step the output is the
    example's unchanged state, so a head must mask its own loss there (the sequence module cannot).

    It runs under the caller's autocast (its values do not feed the reconstruction), so a decoder GEMM
    follows ``precision="bf16-mixed"``. A tensor it reads that is neither its parameter nor listed by
    :meth:`context` gets no gradient in ``mode="reverse"``: forward raises instead of training silently
    wrong (see :func:`~lightning_revrnn.core.graph_checks.check_declared_inputs`).

    Example::

        >>> import torch.nn.functional as F
        >>> from lightning_revrnn import RevGRU
        >>> class SumOfSquares(StepHead):  # per-batch targets given at construction: no state to reset
        ...     def __init__(self, targets: Tensor) -> None:
        ...         super().__init__()
        ...         self.targets = targets
        ...     def forward(self, output: Tensor, start: int) -> Tensor:
        ...         return F.mse_loss(output, self.targets[start : start + len(output)], reduction="sum")
        >>> rnn = RevGRU(3, 4)
        >>> x = torch.randn(20, 2, 3, requires_grad=True)
        >>> loss, h_n = rnn(x, head=SumOfSquares(torch.zeros(20, 2, 4)))
        >>> loss.backward()  # the head runs again, a chunk at a time, inside the reverse sweep
    """

    @abstractmethod
    def forward(self, output: Tensor, start: int) -> Tensor:
        """The scalar sum of the head over steps ``start .. start + len(output) - 1``."""

    def context(self) -> Sequence[Tensor]:
        """Tensors the head reads that are not its parameters (an attention memory, an encoder output).

        ``mode="reverse"`` passes those that require grad through the sweep as inputs, so they receive the
        same gradient as in ``mode="store"`` (summed over the window). Return the very tensors the head
        reads (not copies), set before the call and unchanged until backward. Default: none.
        """
        return ()

    def accumulate_grads(
        self, output: Tensor, start: int, d_value: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> Tensor | None:
        """Reverse sweep, once per chunk: the gradient of ``forward(output, start) · d_value`` with respect to
        ``output`` (a leaf requiring grad; None if the value does not depend on it), adding the gradient of
        each ``(tensor, accumulator)`` target (the head's parameters and context) into its accumulator. Runs
        under the autocast recorded in forward. Default: one ``autograd.grad`` call; override for a cheaper
        form (the translation model's bound attention head adds its generator's gradient block by block)."""
        grads = torch.autograd.grad(self(output, start), [output, *[t for t, _ in targets]], d_value, allow_unused=True)
        add_gradients(targets, grads[1:])
        return grads[0]

    def context_accumulator(self, tensor: Tensor) -> Tensor:
        """Reverse sweep: the zeroed accumulator :meth:`accumulate_grads` receives for ``tensor`` (one of the
        head's parameters or :meth:`context`). Default: zeros of its shape. A head whose gradient reaches a few
        rows of a large tensor may keep a smaller one, turned into the gradient by :meth:`context_gradient`."""
        return torch.zeros_like(tensor)

    def context_gradient(self, tensor: Tensor, accumulator: Tensor) -> Tensor:
        """End of the reverse sweep: ``tensor``'s gradient from its accumulator. Default: the accumulator."""
        return accumulator


#: Steps per chunk of a window of at most :data:`LONG_WINDOW` steps: one input-projection GEMM per chunk and
#: layer, and the reverse sweep's working set (a chunk's records, activations and head block). 4 rather than 8
#: halves that working set: LM step peak at T 70 (PTB sizes, CPU) RevGRU 12.7 -> 9.4 MB (22x below the GRU LM),
#: RevLSTM 16.7 -> 12.8 MB; translation at Multi30K 8.6x -> 10.4x below the GRU; step time in alternating runs
#: RevGRU 1.41x / 1.32x the GRU's (8 steps: 1.51x / 1.43x), RevLSTM 1.95x / 1.76x (1.72x / 1.70x).
CHUNK = 4
#: Steps per chunk of a longer window. There the window's own state (buffer, accumulators) sets the peak and twice
#: the chunks cost time: at T 1000 the 4-step chunks' step took 1.64x (RevGRU) / 2.15x (RevLSTM) the baselines'
#: against 1.43x / 1.80x with 8, for a peak 187x / 122x below them instead of 155x / 117x.
LONG_CHUNK = 8
#: Windows longer than this many steps use :data:`LONG_CHUNK`.
LONG_WINDOW = 128


def chunk_steps(steps: int) -> int:
    """Steps per chunk of a window of ``steps`` steps (the forward and its reverse sweep chunk it alike)."""
    return CHUNK if steps <= LONG_WINDOW else LONG_CHUNK


class StepStem(nn.Module, metaclass=ABCMeta):
    """A per-step input stem run inside the sweep, e.g. embedding lookup + locked dropout of step ``t``.

    With a stem the sequence module's input is whatever the stem reads (token ids ``(T, B)``, say) and
    :meth:`forward` maps a chunk of steps of it (leading dims ``(T', B)``) to the first layer's input
    ``(T', B, input_size)``, elementwise in time. In
    ``mode="reverse"`` the stem runs again for each step of the reverse sweep, so the ``T × B × input``
    tensor it produces is never held between forward and backward. It must be deterministic within a
    window: a dropout mask is drawn when the stem is bound for the batch, not inside :meth:`forward`.

    It runs under the caller's autocast; its output is cast to float32 before the first layer's
    projection, and the reverse sweep re-enters the autocast state recorded in forward, so the projection
    is recomputed bit for bit. Tensors it reads that are not its parameters go in :meth:`context`.

    Example::

        >>> from torch import nn
        >>> from lightning_revrnn import RevGRU
        >>> class Embed(StepStem):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.embedding = nn.Embedding(10, 3)
        ...     def forward(self, inputs: Tensor) -> Tensor:
        ...         return self.embedding(inputs)
        >>> out, h_n = RevGRU(3, 4)(torch.randint(0, 10, (20, 2)), stem=Embed())  # token ids in
        >>> out.shape
        torch.Size([20, 2, 4])
    """

    @abstractmethod
    def forward(self, inputs: Tensor) -> Tensor:
        """The first layer's input ``(T', B, input_size)`` for ``inputs`` of leading dims ``(T', B)``."""

    def context(self) -> Sequence[Tensor]:
        """Tensors the stem reads that are not its parameters; as :meth:`StepHead.context`. Default: none."""
        return ()

    def context_accumulator(self, tensor: Tensor, inputs: Tensor) -> Tensor:
        """Reverse sweep: the zeroed accumulator for ``tensor`` (one of the stem's parameters or :meth:`context`),
        given the window's ``inputs``. Default: zeros of its shape, handed whole to every chunk's
        :meth:`accumulate_grads`. One of another shape is per step (leading dimension ``T``): each chunk gets
        its steps' slice, and :meth:`context_gradient` turns it into the gradient (an embedding's looked-up rows
        when the window has fewer tokens than the vocabulary has words)."""
        return torch.zeros_like(tensor)

    def context_gradient(self, tensor: Tensor, accumulator: Tensor, inputs: Tensor) -> Tensor:
        """End of the reverse sweep: ``tensor``'s gradient from its accumulator. Default: the accumulator."""
        return accumulator

    def accumulate_grads(
        self, inputs: Tensor, output: Tensor, d_output: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> None:
        """Reverse sweep: add the gradient of ``(output · d_output).sum()`` with respect to each target
        tensor into its accumulator. ``output`` is this module's (float32) output for ``inputs``, one chunk
        of steps, with its graph. Override for a cheaper form (the bound :class:`~lightning_revrnn.shared.EmbeddingStem`
        adds its rows by ``index_add_`` instead of a dense ``V × E`` gradient per chunk)."""
        if targets:
            grads = torch.autograd.grad(output, [t for t, _ in targets], d_output, allow_unused=True)
            add_gradients(targets, grads)
