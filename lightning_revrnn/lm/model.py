"""Language modelling with Lightning (spec section 6): one LightningModule for the reversible RNNs and
their ``nn.GRU``/``nn.LSTM`` baselines, with the same AWD-LSTM-style architecture around them.

Reversible models train by reversal with the embedding (:class:`EmbeddingStem`) and the decoder plus
cross-entropy (:class:`DecoderHead`) of every step computed inside the reverse sweep, so neither the
``T × B × emb`` inputs nor the ``T × B × vocab`` logits live from forward to backward.

Batches follow the DataModules' contract: ``{"inputs": (T, B) ids, "targets": (T, B) ids or -100,
"reset": bool}``, consecutive batches continuing the same streams. The hidden state carries across them
(exactly, for reversible models), detached, and restarts at each epoch and wherever ``reset`` is set.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.cli import OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics.text import Perplexity
from typing_extensions import override

from lightning_revrnn.checkpoints import CheckpointFileCheck
from lightning_revrnn.chunked_loss import DEFAULT_BLOCK_BYTES
from lightning_revrnn.core.accounting import MemoryAccounting
from lightning_revrnn.core.rnn import NFRevGRU, NFRevLSTM, ReversibleRNN, RevGRU, RevLSTM
from lightning_revrnn.lm.head import BoundDecoderHead, DecoderHead
from lightning_revrnn.shared import (
    BASELINES,
    BaselineRNN,
    BoundEmbeddingStem,
    EmbeddingStem,
    check_finite_loss,
    detach_state,
    plateau_schedule,
    read_step_figures,
)

RnnType = Literal["revgru", "revlstm", "nfrevgru", "nfrevlstm", "gru", "lstm"]
REVERSIBLE: dict[str, type[ReversibleRNN]] = {
    "revgru": RevGRU,
    "revlstm": RevLSTM,
    "nfrevgru": NFRevGRU,
    "nfrevlstm": NFRevLSTM,
}
Batch = dict[str, Any]
#: What a non-finite training loss asks the user to do.
NONFINITE_FIX = (
    "lower the learning rate or clip gradients harder (the PTB configs use Trainer(gradient_clip_val=0.1)), then "
    "resume from the last checkpoint; a NaN at the first steps points at the data (ids outside the vocabulary) "
    "or at the initialisation."
)


def default_optimizer(params: Iterable[Any]) -> torch.optim.Optimizer:
    """The paper's optimiser: SGD, learning rate 20, weight decay 1.2e-6."""
    return torch.optim.SGD(params, lr=20.0, weight_decay=1.2e-6)


class LanguageModel(CheckpointFileCheck, pl.LightningModule):
    """The paper's language model (AWD-LSTM style) around a reversible RNN or a baseline.

    Args:
        vocab_size: vocabulary size; None: the DataModule's ``vocab_size``, read in ``setup()`` (the embedding and
            decoder are built there and the size saved in the hyperparameters, so checkpoints reload alone).
        rnn: ``revgru``, ``revlstm``, ``nfrevgru``, ``nfrevlstm`` or the baselines ``gru``, ``lstm``.
        num_layers: layers; the top one has ``emb_size`` units (tied decoder), the lower ones
            ``hidden_size``.
        max_forget_bits: reversible models' forgetting limit (2, 3, 5 or None in the paper).
        dropout_*: embedding (word-level), input, between layers (hidden), output; ``dropconnect`` on
            the hidden-to-hidden weights. Defaults are the paper's.
        mode: reversible training mode, ``"reverse"`` or ``"store"``.
        fused: reversible models run their exact half-steps on the fused backend: ``"auto"`` on CUDA, True, False (see
            :class:`~lightning_revrnn.core.rnn.ReversibleRNN`); the baselines ignore it.
        optimizer: a factory from parameters to a torch optimiser (default: SGD, lr 20, wd 1.2e-6).
        lr_factor: multiply the learning rate by this when validation perplexity stalls (÷4).
        seed: dropout masks are drawn from ``(seed, global step, rank)``, so a resumed run sees the masks
            an uninterrupted one would.
        head_block_bytes: reversible models: byte budget of the decoder + cross-entropy row blocks inside the
            reverse sweep (:mod:`lightning_revrnn.chunked_loss`; the step's peak follows it, not ``C × B ×
            vocab``); the baselines use the plain ``nn.Linear`` + ``F.cross_entropy``.

    Logged: ``train_loss``, ``train_ppl`` (per step), ``val_ppl``, ``test_ppl`` (per epoch, torchmetrics).
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        rnn: RnnType = "revgru",
        num_layers: int = 1,
        emb_size: int = 650,
        hidden_size: int = 1150,
        max_forget_bits: int | None = 3,
        dropout_emb: float = 0.1,
        dropout_input: float = 0.4,
        dropout_hidden: float = 0.3,
        dropout_output: float = 0.4,
        dropconnect: float = 0.5,
        mode: Literal["reverse", "store"] = "reverse",
        fused: bool | Literal["auto"] = "auto",
        optimizer: OptimizerCallable = default_optimizer,
        lr_factor: float = 0.25,
        seed: int = 0,
        head_block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        super().__init__()
        if rnn not in REVERSIBLE and rnn not in BASELINES:
            raise ValueError(f"rnn must be one of {sorted([*REVERSIBLE, *BASELINES])}, got {rnn!r}.")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.reversible = rnn in REVERSIBLE
        sizes = [hidden_size] * (num_layers - 1) + [emb_size]
        self.has_vocabulary = False
        if vocab_size is not None:
            self.build_vocabulary_layers(vocab_size)
        self.rnn: nn.Module
        if self.reversible:
            self.rnn = REVERSIBLE[rnn](
                emb_size,
                sizes,
                num_layers=num_layers,
                max_forget_bits=max_forget_bits,
                dropout=dropout_hidden,
                input_dropout=dropout_input,
                dropconnect=dropconnect,
                mode=mode,
                fused=fused,
            )
        else:
            self.rnn = BaselineRNN(rnn, emb_size, sizes, dropout_input, dropout_hidden, dropconnect)
        self.val_ppl = Perplexity(ignore_index=-100)
        self.test_ppl = Perplexity(ignore_index=-100)
        self._hidden: dict[str, Any] = {}

    def build_vocabulary_layers(self, vocab_size: int) -> None:
        """The embedding, the tied decoder and the stem and head around them, for ``vocab_size`` words."""
        hp = self.hparams
        # recorded as saved hyperparameters (also the initial ones the loggers compare with the DataModule's)
        self.save_hyperparameters({"vocab_size": vocab_size})
        self.embedding = nn.Embedding(vocab_size, hp["emb_size"])
        self.decoder = nn.Linear(hp["emb_size"], vocab_size)
        self.decoder.weight = self.embedding.weight  # tied
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.stem = EmbeddingStem(self.embedding, hp["dropout_emb"])
        block_bytes = hp.get("head_block_bytes", DEFAULT_BLOCK_BYTES) if self.reversible else None
        self.head = DecoderHead(self.decoder, hp["dropout_output"], block_bytes)
        self.has_vocabulary = True

    # ------------------------------------------------------------------------------------------- steps
    def _carry(self, stage: str, batch: Batch) -> Any:
        """The state continuing this stream, or None where it restarts."""
        if batch.get("reset", False):
            self._hidden.pop(stage, None)
        return self._hidden.get(stage)

    def _step_seed(self) -> int:
        return zlib.crc32(f"{self.hparams['seed']}:{self.global_step}:{self.global_rank}".encode())

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Mean cross-entropy per target token of the window, the state carried on.

        Raises:
            NonFiniteLossError: the loss is NaN or infinite (checked before backward, so no weight changes; the
                check reads the loss together with the token count the log needs, so it adds no host sync).
        """
        tokens, targets = batch["inputs"], batch["targets"]
        hx = self._carry("train", batch)
        devices = [tokens.device] if tokens.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._step_seed())
            stem = self.stem.bind(training=True)  # stem first, then head: the masks' draw order
            head = self.head.bind(targets, training=True)
            total, h_n = self.window_loss(tokens, hx, stem, head)
        count = (targets != -100).sum().clamp_min(1)
        loss: Tensor = total / count
        # the step's one host read (the log's batch size needs the count anyway), so the check costs no sync
        tokens_counted, loss_value = read_step_figures(count, loss)
        check_finite_loss(self, loss_value, batch_idx, NONFINITE_FIX)
        self._hidden["train"] = self._carried(h_n)
        self.log("train_loss", loss, prog_bar=True, batch_size=int(tokens_counted))
        self.log("train_ppl", loss.detach().exp(), batch_size=int(tokens_counted))
        return loss

    def _carried(self, h_n: Any) -> Any:
        """The state to carry into the next window, detached: for reversible models the exact (float64)
        state, so the carry (and a checkpoint holding it) continues bit for bit."""
        if isinstance(self.rnn, ReversibleRNN):
            return self.rnn.exact_state(h_n)
        return detach_state(h_n)

    @override
    def setup(self, stage: str) -> None:
        if not self.has_vocabulary:
            data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if data is None or "vocab_size" not in dir(data):
                raise ValueError(
                    f"LanguageModel(vocab_size=None) reads the vocabulary size from the DataModule, but "
                    f"{type(data).__name__} has no vocab_size. Fix: pass vocab_size, or train with a language-model "
                    "DataModule (e.g. PTBDataModule)."
                )
            self.build_vocabulary_layers(int(data.vocab_size))
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if self.reversible and precision.endswith("-true") and precision != "32-true":
            raise ValueError(
                f"LanguageModel(rnn={self.hparams['rnn']!r}) cannot run with Trainer(precision={precision!r}): "
                "a reversible RNN computes in exact float32 fixed point, so its parameters must stay float32. "
                "Fix: use Trainer(precision='32-true') (the default), or 'bf16-mixed' / '16-mixed' to run the "
                "embedding and decoder under autocast while the recurrence stays exact."
            )

    def window_loss(
        self, tokens: Tensor, hx: Any, stem: BoundEmbeddingStem, head: BoundDecoderHead
    ) -> tuple[Tensor, Any]:
        """Summed cross-entropy of one training window and its final state, with the window's bound stem and
        head (their masks and targets). Reversible models run stem and head inside the reverse sweep."""
        if self.reversible:
            total, h_n = self.rnn(tokens, hx, head=head, stem=stem)
            return total, h_n
        out, h_n = self.rnn(stem(tokens), hx)
        return head(out, 0), h_n

    def _evaluate(self, stage: str, batch: Batch, metric: Perplexity) -> None:
        tokens, targets = batch["inputs"], batch["targets"]
        hx = self._carry(stage, batch)
        stem, head = self.stem.bind(training=False), self.head.bind(targets, training=False)
        out, h_n = self.rnn(stem(tokens), hx)
        self._hidden[stage] = self._carried(h_n)
        metric.update(head.logits(out).transpose(0, 1), targets.t())
        self.log(f"{stage}_ppl", metric, prog_bar=True)

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch, self.val_ppl)

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch, self.test_ppl)

    @override
    def on_train_epoch_start(self) -> None:
        self._hidden.pop("train", None)

    @override
    def on_validation_epoch_start(self) -> None:
        self._hidden.pop("val", None)

    @override
    def on_test_epoch_start(self) -> None:
        self._hidden.pop("test", None)

    # ------------------------------------------------------------------------------------ optimisation
    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return plateau_schedule(self.optimizer_factory(self.parameters()), self.hparams["lr_factor"])

    # ------------------------------------------------------------------------------------ checkpointing
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the training state carried into the next window, every rank's (each carries its own streams).

        With the DataModules' resumable training loaders, a mid-epoch checkpoint also holds the stream position,
        so a resumed fit feeds each carried state the window that follows it, as the uninterrupted run would.
        Under DDP this gathers from all ranks: like ``trainer.save_checkpoint`` itself, call it on every rank.
        """
        hidden = self._hidden.get("train")
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if hidden is None or world_size == 1:
            per_rank = [hidden]
        else:
            gathered = self.all_gather(hidden)
            per_rank = [apply_to_collection(gathered, Tensor, lambda t, r=r: t[r].cpu()) for r in range(world_size)]
        checkpoint["revrnn_hidden"] = {"world_size": world_size, "per_rank": per_rank}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's carried training state (dropped, with a warning, if the world size changed)."""
        saved = checkpoint.get("revrnn_hidden")
        if isinstance(saved, dict) and "per_rank" in saved:
            world_size = self.trainer.world_size if self._trainer is not None else 1
            rank = self.global_rank if self._trainer is not None else 0
            if saved["world_size"] != world_size:
                rank_zero_warn(
                    f"The checkpoint carries the hidden state of {saved['world_size']} process(es), this run has "
                    f"{world_size}: the training streams restart from a zero state. Resume on "
                    f"{saved['world_size']} process(es) to continue them exactly."
                )
                saved = None
            else:
                saved = saved["per_rank"][rank]
        self._hidden = {} if saved is None else {"train": saved}

    @override
    def on_train_start(self) -> None:
        # a restored carry was loaded before the model moved to its device
        if "train" in self._hidden:
            self._hidden["train"] = apply_to_collection(self._hidden["train"], Tensor, lambda t: t.to(self.device))

    # -------------------------------------------------------------------------------------- accounting
    def memory_stats(self) -> MemoryAccounting | None:
        """The reversible RNN's accounting for the last training window; None for the baselines."""
        return self.rnn.memory_stats() if isinstance(self.rnn, ReversibleRNN) else None
