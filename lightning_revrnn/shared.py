"""Building blocks both model families use: the embedding stem run inside the reverse sweep, the ``nn.GRU`` /
``nn.LSTM`` baseline stack with the same regularisation, the paper's learning-rate schedule, a detach for
carried states and the check that stops training at a non-finite loss. Neither :mod:`lightning_revrnn.lm` nor
:mod:`lightning_revrnn.translation` owns them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torch.func import functional_call
from typing_extensions import override

from lightning_revrnn.core.dropout import locked_mask
from lightning_revrnn.core.protocol import StepStem, lookup_gradient

#: The baselines' recurrent layers (cuDNN where available).
BASELINES: dict[str, type[nn.GRU] | type[nn.LSTM]] = {"gru": nn.GRU, "lstm": nn.LSTM}


def detach_state(state: Any) -> Any:
    """Detach a nested state (tensor, list or tuple of them) for truncated BPTT."""
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    return state


class EmbeddingStem(nn.Module):
    """Embedding lookup with word-level embedding dropout (one keep/drop decision per vocabulary word
    per window, as AWD-LSTM's embedded dropout, applied by gathering the word mask per token).

    It holds no per-batch state: :meth:`bind` draws one window's word mask and returns the
    :class:`BoundEmbeddingStem` (a :class:`~lightning_revrnn.core.protocol.StepStem`) that reads it, which is what
    the sequence module runs. The bound stem shares this stem's embedding (the same parameters, not copies).

    Args:
        embedding: the lookup (its weight may be tied to a decoder's).
        dropout: probability of dropping a vocabulary word for a whole window.

    Example (with a :class:`~lightning_revrnn.lm.DecoderHead`, as in the language model)::

        >>> from lightning_revrnn import DecoderHead, RevGRU
        >>> stem = EmbeddingStem(nn.Embedding(10, 4), dropout=0.1)
        >>> head = DecoderHead(nn.Linear(4, 10), dropout=0.4)
        >>> rnn = RevGRU(input_size=4, hidden_size=4)
        >>> tokens, targets = torch.randint(0, 10, (6, 2)), torch.randint(0, 10, (6, 2))
        >>> # training: bind anew for every window; the stem's mask is drawn first, then the head's
        >>> window_stem = stem.bind(training=True)
        >>> window_head = head.bind(targets, training=True)
        >>> loss_sum, h_n = rnn(tokens, None, head=window_head, stem=window_stem)
        >>> loss_sum.backward()  # the lookup is redone inside the reverse sweep
        >>> stem.embedding.weight.grad.shape
        torch.Size([10, 4])
        >>> # evaluation: no mask, the plain lookup (T, B, 4)
        >>> stem.bind(training=False)(tokens).shape
        torch.Size([6, 2, 4])
    """

    def __init__(self, embedding: nn.Embedding, dropout: float) -> None:
        super().__init__()
        self.embedding = embedding
        self.dropout = dropout

    def bind(self, training: bool) -> BoundEmbeddingStem:
        """The stem of one window: its word mask drawn now from the global RNG (none in evaluation)."""
        w = self.embedding.weight
        word_mask = locked_mask((w.shape[0], 1), self.dropout, w) if training else None
        return BoundEmbeddingStem(self.embedding, word_mask)


class BoundEmbeddingStem(StepStem):
    """:class:`EmbeddingStem` bound to one window's word mask ``(V, 1)`` (None: no embedding dropout), made by
    :meth:`EmbeddingStem.bind`. Its embedding is the unbound stem's (same parameters). The mask lives as long
    as this object, i.e. as long as the window's graph that holds it: nothing to clear after backward."""

    def __init__(self, embedding: nn.Embedding, word_mask: Tensor | None) -> None:
        super().__init__()
        self.embedding = embedding
        self.word_mask = word_mask

    @override
    def forward(self, inputs: Tensor) -> Tensor:
        x: Tensor = self.embedding(inputs)
        return x if self.word_mask is None else x * self.word_mask[inputs]

    def _plain(self) -> bool:
        """Whether the lookup's gradient is its rows, added up by index (no padding index, norm or scaling)."""
        emb = self.embedding
        return emb.padding_idx is None and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse

    @override
    def context_accumulator(self, tensor: Tensor, inputs: Tensor) -> Tensor:
        """The weight's gradient per looked-up row ``(T, B, E)`` when the window has fewer tokens than the
        vocabulary has words (a translation batch: a fraction of the ``V × E`` accumulator); else as by default."""
        weight = self.embedding.weight
        if tensor is weight and self._plain() and inputs.numel() < weight.shape[0]:
            return weight.new_zeros((*inputs.shape, weight.shape[1]), dtype=torch.float32)
        return super().context_accumulator(tensor, inputs)

    @override
    def context_gradient(self, tensor: Tensor, accumulator: Tensor, inputs: Tensor) -> Tensor:
        """The weight's ``V × E`` gradient from per-row accumulation, built once the sweep is done."""
        return accumulator if accumulator.shape == tensor.shape else lookup_gradient(tensor, inputs, accumulator)

    @override
    def accumulate_grads(
        self, inputs: Tensor, output: Tensor, d_output: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> None:
        """The embedding weight's gradient: the chunk's rows added by ``index_add_`` into a ``V × E``
        accumulator, or into the chunk's slice of a per-row one (no dense ``V × E`` gradient per chunk either
        way); any other target by autograd."""
        weight = self.embedding.weight
        rest = []
        for tensor, acc in targets:
            if tensor is weight and self._plain():
                rows = d_output if self.word_mask is None else d_output * self.word_mask[inputs]
                if acc.shape == weight.shape:
                    acc.index_add_(0, inputs.reshape(-1), rows.reshape(-1, rows.shape[-1]).to(acc.dtype))
                else:
                    acc += rows
            else:
                rest.append((tensor, acc))
        super().accumulate_grads(inputs, output, d_output, rest)


class BaselineRNN(nn.Module):
    """``nn.GRU``/``nn.LSTM`` layers (cuDNN where available) with the reversible models' regularisation:
    locked dropout on the input and between layers, DropConnect on the hidden-to-hidden weights. The baseline
    the reversible models are compared with: it stores every state for backward.

    Args:
        kind: ``"gru"`` or ``"lstm"``.
        input_size: features of ``x``.
        sizes: hidden size of each layer.
        input_dropout: locked dropout on the input of the first layer (one mask per window).
        dropout: locked dropout between layers.
        dropconnect: DropConnect on each layer's hidden-to-hidden weights (one mask per window).

    ``out, finals = rnn(x, hx=None)``: ``x`` is ``(T, B, F)``; ``finals`` (and ``hx``) hold one state per
    layer, as that layer's ``nn.GRU``/``nn.LSTM`` returns it.

    Example::

        >>> rnn = BaselineRNN("lstm", input_size=3, sizes=[4, 6], input_dropout=0.1, dropout=0.2, dropconnect=0.3)
        >>> out, finals = rnn(torch.randn(5, 2, 3))
        >>> out.shape, len(finals), finals[1][0].shape  # per layer nn.LSTM's (h, c), h: (1, B, H_l)
        (torch.Size([5, 2, 6]), 2, torch.Size([1, 2, 6]))
    """

    def __init__(
        self,
        kind: str,
        input_size: int,
        sizes: list[int],
        input_dropout: float,
        dropout: float,
        dropconnect: float,
    ) -> None:
        super().__init__()
        ins = [input_size, *sizes[:-1]]
        self.layers = nn.ModuleList(BASELINES[kind](i, h) for i, h in zip(ins, sizes))
        self.is_lstm = kind == "lstm"
        self.input_dropout, self.dropout, self.dropconnect = input_dropout, dropout, dropconnect

    def forward(self, x: Tensor, hx: list[Any] | None = None) -> tuple[Tensor, list[Any]]:
        finals = []
        for l, layer in enumerate(self.layers):
            p = self.input_dropout if l == 0 else self.dropout
            mask = locked_mask((x.shape[1], x.shape[2]), p, x) if self.training else None
            x = x if mask is None else x * mask
            h = None if hx is None else hx[l]
            if self.training and self.dropconnect > 0:
                w = cast(Tensor, layer.weight_hh_l0)
                dropped = w * cast(Tensor, locked_mask(tuple(w.shape), self.dropconnect, w))  # p > 0: a mask
                x, h_n = functional_call(layer, {**dict(layer.named_parameters()), "weight_hh_l0": dropped}, (x, h))
            else:
                x, h_n = layer(x, h)
            finals.append(h_n)
        return x, finals


def plateau_schedule(optimizer: torch.optim.Optimizer, factor: float) -> OptimizerLRScheduler:
    """The paper's schedule: the learning rate times ``factor`` after an epoch whose ``val_ppl`` did not
    improve (checked once per epoch; skipped while no validation has run)."""
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=0)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "monitor": "val_ppl", "interval": "epoch", "strict": False},
    }


class NonFiniteLossError(FloatingPointError):
    """A training step's loss is NaN or infinite. Raised before its backward: no gradient of it was computed and
    no optimizer step ran, so the weights are those the step started from."""


def read_step_figures(*figures: Tensor) -> list[float]:
    """The scalars ``figures`` (any dtype, any device) as floats, in one host read: one synchronisation with
    the device for all of them (float32: counts are exact up to 2^24)."""
    return torch.stack([f.detach().reshape(()).float() for f in figures]).tolist()


def check_finite_loss(module: pl.LightningModule, loss: float, batch_idx: int, fix: str) -> None:
    """Raise :class:`NonFiniteLossError` naming the step, the batch and ``fix`` if the training ``loss`` (a
    value already read from the device) is NaN or infinite.

    Called from ``training_step``, before Lightning runs the backward and the optimizer step: gradient
    clipping does not stop a NaN (the clipped norm is NaN too), so the first NaN loss would otherwise spread
    into every weight and surface a step later as an unrelated error."""
    if math.isfinite(loss):
        return
    attached = module._trainer is not None
    world = module.trainer.world_size if attached else 1
    rank = f", rank {module.global_rank} of {world}" if world > 1 else ""
    raise NonFiniteLossError(
        f"{type(module).__name__}: the training loss is {loss} at global step {module.global_step} (epoch "
        f"{module.current_epoch}, batch_idx {batch_idx}{rank}). Training stopped before this step's backward, so "
        f"the weights are still finite (those after {module.global_step} optimizer steps). Fix: {fix}"
    )
