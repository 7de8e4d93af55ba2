"""Attention seq2seq translation with a reversible encoder and decoder (spec sections 5-6): one LightningModule
for RevGRU / RevLSTM and the ``nn.GRU`` / ``nn.LSTM`` baselines; it builds and trains, and decodes through its
:class:`~lightning_revrnn.translation.inference.TranslationDecoding` half. The source embedding runs inside the
encoder's sweep, the decoder starts from the encoder's final state with gradient (chaining), and the attention
head computes attention, generator and cross-entropy a chunk of target steps at a time inside the decoder's
sweep (docs/design.md). Batches are :class:`~lightning_revrnn.datamodules.translation.TranslationBatch`.
"""

from __future__ import annotations

import zlib
from typing import Any, Literal, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import OptimizerCallable
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from typing_extensions import override

from lightning_revrnn.checkpoints import CheckpointFileCheck
from lightning_revrnn.chunked_loss import DEFAULT_BLOCK_BYTES
from lightning_revrnn.core.rnn import ReversibleRNN, RevGRU, RevLSTM
from lightning_revrnn.datamodules.translation import (
    TextPreprocessing,
    TranslationBatch,
    TranslationVocabulary,
)
from lightning_revrnn.shared import BaselineRNN, EmbeddingStem, check_finite_loss, plateau_schedule, read_step_figures
from lightning_revrnn.translation.accounting import TranslationAccounting
from lightning_revrnn.translation.attention import AttentionHead, LuongAttention
from lightning_revrnn.translation.bleu import DetokenizedBLEU, TokenizedBLEU, detokenize
from lightning_revrnn.translation.checks import (
    CHECKPOINT_FIX,
    MODEL_FIX,
    NONFINITE_FIX,
    check_arguments,
    check_same_vocabularies,
    check_source_rows,
    empty_source_rows,
)
from lightning_revrnn.translation.encoder import (
    BaselineEncoder,
    reversible_encoder,
    stored_units_of,
)
from lightning_revrnn.translation.inference import TranslationDecoding
from lightning_revrnn.translation.prediction_file import PredictionFile
from lightning_revrnn.translation.saved_vocabulary import SAVED_KEY, load_vocabularies, save_vocabularies
from lightning_revrnn.translation.token_metrics import TokenCrossEntropy

RnnType = Literal["revgru", "revlstm", "gru", "lstm"]
ContextType = Literal["slice", "emb", "emb+slice", "hidden"]
DECODERS: dict[str, type[ReversibleRNN]] = {"revgru": RevGRU, "revlstm": RevLSTM}
#: The paper's SGD learning rates (Multi30K and IWSLT).
PAPER_LR: dict[str, float] = {"lstm": 1.0, "revlstm": 0.5, "gru": 0.2, "revgru": 0.2}
#: Arguments that only steer decoding and output: kept out of the saved hyperparameters (pass them again, or to
#: ``load_from_checkpoint``, when evaluating a checkpoint).
DECODING_SETTINGS = ("beam", "length_penalty", "max_decode_len", "prediction_file")
#: Uniform initialisation range of embeddings, attention and generator (OpenNMT-py's ``param_init``).
INIT_RANGE = 0.1


class TranslationModel(CheckpointFileCheck, TranslationDecoding, pl.LightningModule):
    """The paper's attention seq2seq model around reversible RNNs or the ``nn.GRU``/``nn.LSTM`` baselines.

    Args:
        rnn: ``revgru``, ``revlstm`` (reversible encoder and decoder) or the baselines ``gru``, ``lstm``.
        hidden_size: units per layer (even for reversible cells), encoder and decoder alike.
        embedding_size: source and target word embedding size.
        num_layers: layers of the encoder and of the decoder.
        context: the attention memory: ``slice`` (the first ``slice_dim`` units of the encoder's top
            ``h1``, stored), ``emb`` (source embeddings, recomputed), ``emb+slice`` (both) or ``hidden`` (the
            whole top state, stored). Default: ``emb+slice`` for reversible models, ``hidden`` for baselines.
        slice_dim: stored units per step for the slice contexts (at most ``hidden_size // 2``).
        max_forget_bits: reversible cells' forgetting limit (the paper's NMT rows use 3).
        dropout: locked dropout on the RNN inputs and between layers, on the attentional output and on the
            attention memory (the paper's 0.4 everywhere).
        mode: reversible training mode, ``"reverse"`` or ``"store"`` (the gradient reference).
        fused: reversible encoder and decoder run their exact half-steps on the fused backend: ``"auto"`` on
            CUDA, True, False (see :class:`~lightning_revrnn.core.rnn.ReversibleRNN`); the baselines ignore it.
        optimizer: a factory from parameters to an optimiser. Default: the paper's SGD, lr 1 (LSTM),
            0.5 (RevLSTM), 0.2 (GRU, RevGRU). Clip gradients with ``Trainer(gradient_clip_val=5)``.
        lr_factor: multiply the learning rate by this when validation perplexity does not improve.
        beam: beam size for test and predict (validation BLEU decodes greedily, to stay cheap).
        length_penalty: beam score ``log p / len**length_penalty`` (0: raw log-probability).
        max_decode_len: most target tokens decoded per sentence.
        src_vocab_size, tgt_vocab_size: vocabulary sizes; None: read from the DataModule's ``src_vocab`` /
            ``tgt_vocab`` in ``setup()`` (the layers are built there and the sizes saved in the hyperparameters,
            so checkpoints reload without the DataModule).
        prediction_file: ``predict`` writes one detokenised translation per line here (with several
            processes, one file per rank: ``name.rank<r>.ext``); None: nothing is written.
            ``beam``, ``length_penalty``, ``max_decode_len`` and ``prediction_file`` only steer decoding: they
            are plain attributes, not saved hyperparameters, so a checkpoint evaluated later (also with
            ``revrnn test/predict --ckpt_path``) decodes with the values given then.
        dropout_seed: dropout masks come from ``(dropout_seed, global step, rank)`` (not ``seed``: the
            translation DataModules' ``seed`` shuffles batches, and Lightning refuses to log two different
            values under one hyperparameter name).
        head_block_bytes: reversible models: byte budget of the decoder head's generator + cross-entropy
            temporaries (:func:`~lightning_revrnn.chunked_loss.linear_cross_entropy`: rows of logits at a time,
            ``budget / (4 · tgt_vocab)`` float32 rows per block, half that under bf16/fp16 autocast, at least one),
            so the head's memory does not grow with chunk × batch × vocabulary. Default 4 MiB (56 rows at
            Multi30K's 18,726 German words). The baselines ignore it (plain ``nn.Linear`` + ``F.cross_entropy``).

    Logged: ``train_loss``, ``train_ppl`` (per step, per target token of this rank's batch); ``val_loss``,
    ``val_ppl``, ``val_bleu`` (greedy decoding, to keep validation cheap), ``test_loss``, ``test_ppl``,
    ``test_bleu`` (beam search; the paper's BLEU: multi-bleu on the tokenised, lower-cased text) and
    ``test_bleu_detok`` (sacreBLEU 13a on detokenised text). Evaluation losses are per target token from
    sums over tokens reduced across ranks; BLEU from n-gram statistics summed across ranks.

    The vocabularies (their tokens) and the DataModule's text preprocessing go into every checkpoint: a loaded
    model decodes with its own words, refuses a DataModule whose ids differ (:meth:`setup`,
    :meth:`on_load_checkpoint`) and translates raw text on its own (:meth:`translate_text`, ``revrnn translate``).
    """

    def __init__(
        self,
        rnn: RnnType = "revgru",
        hidden_size: int = 300,
        embedding_size: int = 300,
        num_layers: int = 1,
        context: ContextType | None = None,
        slice_dim: int = 20,
        max_forget_bits: int | None = 3,
        dropout: float = 0.4,
        mode: Literal["reverse", "store"] = "reverse",
        fused: bool | Literal["auto"] = "auto",
        optimizer: OptimizerCallable | None = None,
        lr_factor: float = 0.5,
        beam: int = 5,
        length_penalty: float = 0.0,
        max_decode_len: int = 100,
        src_vocab_size: int | None = None,
        tgt_vocab_size: int | None = None,
        prediction_file: str | None = None,
        dropout_seed: int = 0,
        head_block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> None:
        super().__init__()
        self.reversible = rnn in DECODERS
        self.context_type = context if context is not None else ("emb+slice" if self.reversible else "hidden")
        check_arguments(
            rnn,
            hidden_size,
            self.context_type,
            slice_dim,
            beam,
            max_decode_len,
            embedding_size=embedding_size,
            num_layers=num_layers,
            dropout=dropout,
        )
        # Decoding settings are not hyperparameters: LightningCLI's --ckpt_path puts a checkpoint's hyperparameters
        # over the command line, so `revrnn test --ckpt_path ... --model.beam 1` would silently keep the old beam.
        self.save_hyperparameters(ignore=["optimizer", *DECODING_SETTINGS])
        self.beam, self.length_penalty, self.max_decode_len = beam, length_penalty, max_decode_len
        self.prediction_file = prediction_file
        self.optimizer_factory = optimizer
        self.src_vocab: TranslationVocabulary | None = None
        self.tgt_vocab: TranslationVocabulary | None = None
        self.tgt_lang = "de"
        self.preprocessing: TextPreprocessing | None = None
        self._vocab_origin = "the set_vocabularies() call"  # where the vocabularies came from, for error messages
        self.built = False
        self.val_loss, self.val_ppl = TokenCrossEntropy(), TokenCrossEntropy(perplexity=True)
        self.test_loss, self.test_ppl = TokenCrossEntropy(), TokenCrossEntropy(perplexity=True)
        self.val_bleu, self.test_bleu = TokenizedBLEU(), TokenizedBLEU()
        self.test_bleu_detok = DetokenizedBLEU()
        self._predictions: PredictionFile | None = None
        if src_vocab_size is not None and tgt_vocab_size is not None:
            self.build(src_vocab_size, tgt_vocab_size)

    # -------------------------------------------------------------------------------------------- layers
    @property
    def stored_units(self) -> int:
        """Encoder units stored per step for attention: the slice, the whole top state, or none (``emb``)."""
        units: int = {
            "slice": self.hparams["slice_dim"],
            "emb+slice": self.hparams["slice_dim"],
            "emb": 0,
            "hidden": self.hparams["hidden_size"],
        }[self.context_type]
        return units

    def build(self, src_vocab_size: int, tgt_vocab_size: int) -> None:
        """Create the layers for the given vocabulary sizes (once; also records them in the hyperparameters)."""
        if self.built:
            return
        hp = self.hparams
        # recorded as saved hyperparameters (also the initial ones the loggers log)
        self.save_hyperparameters({"src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size})
        E, H, L, p = hp["embedding_size"], hp["hidden_size"], hp["num_layers"], hp["dropout"]
        self.src_embedding = nn.Embedding(src_vocab_size, E)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, E)
        self.src_stem = EmbeddingStem(self.src_embedding, 0.0)
        self.tgt_stem = EmbeddingStem(self.tgt_embedding, 0.0)
        uses_emb = self.context_type in ("emb", "emb+slice")
        memory_size = (E if uses_emb else 0) + self.stored_units
        generator = nn.Linear(H, tgt_vocab_size)
        block_bytes = hp.get("head_block_bytes", DEFAULT_BLOCK_BYTES) if self.reversible else None
        self.head = AttentionHead(
            LuongAttention(H, memory_size), generator, self.src_embedding if uses_emb else None, p, block_bytes
        )
        for param in [*self.src_embedding.parameters(), *self.tgt_embedding.parameters(), *self.head.parameters()]:
            nn.init.uniform_(param, -INIT_RANGE, INIT_RANGE)
        self.encoder: nn.Module
        self.decoder: nn.Module
        rnn = hp["rnn"]
        if self.reversible:
            common = dict(
                num_layers=L,
                max_forget_bits=hp["max_forget_bits"],
                dropout=p,
                input_dropout=p,
                mode=hp["mode"],
                fused=hp.get("fused", False),  # a checkpoint from before the switch has none
            )
            core_units = self.stored_units if self.context_type != "hidden" else 0
            self.encoder = reversible_encoder(rnn, self.stored_units, core_units, input_size=E, hidden_size=H, **common)
            self.decoder = DECODERS[rnn](E, H, **common)
        else:
            self.encoder = BaselineEncoder(rnn, E, [H] * L, input_dropout=p, dropout=p)
            self.decoder = BaselineRNN(rnn, E, [H] * L, input_dropout=p, dropout=p, dropconnect=0.0)
        self.built = True

    def _require_built(self) -> None:
        if not self.built:
            raise RuntimeError(
                "TranslationModel has no layers yet: its vocabulary sizes are unknown. Fix: pass src_vocab_size and "
                "tgt_vocab_size, or run it in a Trainer with a translation DataModule (setup() reads its vocabularies)."
            )

    @override
    def setup(self, stage: str) -> None:
        """Take the DataModule's vocabularies, language and preprocessing and build the layers for their sizes.

        A model that has vocabularies already (trained, or loaded from a checkpoint) keeps them: the DataModule's
        must be the same tokens in the same order, else this raises (its batches' ids would mean other words).
        """
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        src, tgt = getattr(data, "src_vocab", None), getattr(data, "tgt_vocab", None)
        if src is not None and tgt is not None:
            name = f"the DataModule ({type(data).__name__})"
            if self.src_vocab is not None and self.tgt_vocab is not None:
                check_same_vocabularies((self.src_vocab, self.tgt_vocab), (src, tgt), ("the model", name), MODEL_FIX)
                if self.preprocessing is None:
                    self.preprocessing = getattr(data, "preprocessing", None)
            else:
                self.set_vocabularies(
                    src, tgt, getattr(data, "tgt_lang", self.tgt_lang), getattr(data, "preprocessing", None)
                )
                self._vocab_origin = name
        if not self.built:
            if self.src_vocab is None or self.tgt_vocab is None:
                raise ValueError(
                    "TranslationModel(src_vocab_size=None, tgt_vocab_size=None) reads its vocabularies from the "
                    f"DataModule, but {type(data).__name__} has no src_vocab/tgt_vocab after setup(). Fix: use a "
                    "translation DataModule (e.g. Multi30KDataModule) or pass both vocabulary sizes."
                )
            self.build(len(self.src_vocab), len(self.tgt_vocab))

    def set_vocabularies(
        self,
        src: TranslationVocabulary,
        tgt: TranslationVocabulary,
        tgt_lang: str = "de",
        preprocessing: TextPreprocessing | None = None,
    ) -> None:
        """Use these vocabularies (the target one turns decoded ids into text; their sizes must match the layers)
        and, for :meth:`translate_text`, the preprocessing of the text they were built from."""
        hp = self.hparams
        for side, vocab in (("src", src), ("tgt", tgt)):
            size = hp[f"{side}_vocab_size"]
            if size is not None and size != len(vocab):
                raise ValueError(
                    f"The model has {side}_vocab_size={size} but the {side} vocabulary has {len(vocab)} tokens. Fix: "
                    "build the DataModule with the vocabulary settings the model was trained with."
                )
        self.src_vocab, self.tgt_vocab, self.tgt_lang = src, tgt, tgt_lang
        self.test_bleu_detok.lang = tgt_lang
        if preprocessing is not None:
            self.preprocessing = preprocessing
        self._vocab_origin = "the set_vocabularies() call"

    # ------------------------------------------------------------------------------------- forward pass
    def encode(self, src: Tensor, src_keep: Tensor) -> tuple[Tensor | None, Any]:
        """The stored attention units ``(S, B, D_s)`` (None for ``context="emb"``) and the encoder's final state."""
        stem = self.src_stem.bind(training=self.training)
        if self.reversible:
            outputs, h_n = self.encoder(src, stem=stem, keep=src_keep)
        else:
            outputs, h_n = self.encoder(stem(src), src_keep)
        units = self.stored_units
        return (stored_units_of(outputs, units) if units else None), h_n

    def summed_loss(self, batch: TranslationBatch) -> Tensor:
        """The cross-entropy of ``batch`` under teacher forcing, summed over its real target tokens (training
        or evaluation, as the module's mode; dropout masks are drawn from the global RNG)."""
        self._require_built()
        stored, h_n = self.encode(batch.src, batch.src_keep)
        head = self.head.bind(stored, batch.src, batch.src_keep, batch.tgt_out, batch.tgt_keep, self.training)
        stem = self.tgt_stem.bind(training=self.training)
        if self.reversible:
            total, _ = self.decoder(batch.tgt_in, h_n, head=head, stem=stem, keep=batch.tgt_keep)
            return cast(Tensor, total)
        outputs, _ = self.decoder(stem(batch.tgt_in), h_n)
        return head.chunked(outputs)

    def _step_seed(self) -> int:
        return zlib.crc32(f"{self.hparams['dropout_seed']}:{self.global_step}:{self.global_rank}".encode())

    @override
    def training_step(self, batch: TranslationBatch, batch_idx: int) -> Tensor:
        """Summed cross-entropy divided by the number of target tokens of the global batch (all ranks), times
        the world size: DDP's gradient average is then the gradient of the global per-token mean, exactly
        what one process computes on the whole batch.

        Raises:
            ValueError: a row of the batch has no source token (naming it).
            NonFiniteLossError: the loss is NaN or infinite. Both are checked before backward, so no weight
                changes, and read together with the token count the log needs: no extra host sync.
        """
        devices = [batch.src.device] if batch.src.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._step_seed())
            total = self.summed_loss(batch)
        count = batch.tgt_keep.sum()
        world = self.trainer.world_size if self._trainer is not None else 1
        global_count = self.trainer.strategy.reduce(count.float(), reduce_op="sum") if world > 1 else count
        loss = total * world / global_count.clamp_min(1)
        local = total.detach() / count.clamp_min(1)
        tokens, local_value, empty = read_step_figures(count, local, empty_source_rows(batch.src_keep))  # one sync
        if empty:
            check_source_rows(batch.src_keep, indices=batch.indices)
        check_finite_loss(self, local_value, batch_idx, NONFINITE_FIX)
        self.log("train_loss", local, prog_bar=True, batch_size=int(tokens))
        self.log("train_ppl", local.exp(), batch_size=int(tokens))
        return loss

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, stage: str, batch: TranslationBatch) -> list[str]:
        """Teacher-forced loss into ``{stage}_loss``/``{stage}_ppl``; returns the tokenised translations
        (greedy for validation, beam search for test)."""
        total = self.summed_loss(batch)
        count = batch.tgt_keep.sum()
        size = len(batch.references)
        for name in ("loss", "ppl"):
            metric = getattr(self, f"{stage}_{name}")
            metric.update(total, count)
            self.log(f"{stage}_{name}", metric, prog_bar=name == "ppl", batch_size=size)
        beam = 1 if stage == "val" else self.beam
        return self.hypotheses(self.translate(batch.src, batch.src_keep, beam=beam))

    @override
    def validation_step(self, batch: TranslationBatch, batch_idx: int) -> None:
        hypotheses = self._evaluate("val", batch)
        self.val_bleu.update(hypotheses, batch.references)
        self.log("val_bleu", self.val_bleu, prog_bar=True, batch_size=len(batch.references))

    @override
    def test_step(self, batch: TranslationBatch, batch_idx: int) -> None:
        hypotheses = self._evaluate("test", batch)
        size = len(batch.references)
        self.test_bleu.update(hypotheses, batch.references)
        self.test_bleu_detok.update(hypotheses, batch.references)
        self.log("test_bleu", self.test_bleu, batch_size=size)
        self.log("test_bleu_detok", self.test_bleu_detok, batch_size=size)

    @override
    def predict_step(self, batch: TranslationBatch, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Detokenised beam-search translations of the batch's sources, in the split's order (``batch.indices``;
        the DataModule's predict batches follow the file, so one process writes the file's order), also
        written to ``prediction_file``."""
        ids = self.translate(batch.src, batch.src_keep, beam=self.beam)
        lines = [detokenize(h, self.tgt_lang) for h in self.hypotheses(ids)]
        if batch.indices:  # rows come sorted by source length: back to the split's order
            lines = [line for _, line in sorted(zip(batch.indices, lines), key=lambda pair: pair[0])]
        if self._predictions is not None:
            self._predictions.write(lines)
        return lines

    @override
    def on_predict_epoch_start(self) -> None:
        if self.prediction_file is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            self._predictions = PredictionFile(self.prediction_file, self.global_rank, world)

    @override
    def on_predict_epoch_end(self) -> None:
        if self._predictions is not None:
            self._predictions.close()
            self._predictions = None

    # ------------------------------------------------------------------------------------ optimisation
    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=PAPER_LR[self.hparams["rnn"]])
        else:
            optimizer = self.optimizer_factory(self.parameters())
        return plateau_schedule(optimizer, self.hparams["lr_factor"])

    # ------------------------------------------------------------------------------------ checkpointing
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the vocabularies (the tokens) and the text preprocessing with the weights, so a loaded checkpoint
        decodes with its own words and translates raw text without the DataModule."""
        if self.src_vocab is not None and self.tgt_vocab is not None:
            checkpoint[SAVED_KEY] = save_vocabularies(self.src_vocab, self.tgt_vocab, self.tgt_lang, self.preprocessing)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's vocabularies; a model set up already (``Trainer(...).fit/test(model, data,
        ckpt_path=...)``) must have the same ones, else this raises naming what differs and the fix."""
        saved = load_vocabularies(checkpoint)
        if saved is None:
            return
        src, tgt, tgt_lang, preprocessing = saved
        if self.src_vocab is None or self.tgt_vocab is None:
            self.set_vocabularies(src, tgt, tgt_lang, preprocessing)
            self._vocab_origin = "the checkpoint"
            return
        # Trainer(...).fit/validate/test/predict(model, data, ckpt_path=...): the model was set up from the data
        check_same_vocabularies(
            (src, tgt), (self.src_vocab, self.tgt_vocab), ("the checkpoint", self._vocab_origin), CHECKPOINT_FIX
        )
        if preprocessing is not None:
            self.preprocessing = preprocessing

    # -------------------------------------------------------------------------------------- accounting
    def memory_stats(self) -> TranslationAccounting | None:
        """The paper's accounting of the last training window, per side (the encoder's includes its stored
        attention units); None for the baselines."""
        if not self.reversible:
            return None
        encoder, decoder = cast(ReversibleRNN, self.encoder), cast(ReversibleRNN, self.decoder)
        return TranslationAccounting(encoder.memory_stats(), decoder.memory_stats())

    def memory_summary(self) -> dict[str, dict[str, float]] | None:
        """Per side, the paper's ratios of the last training window: ``actual_ratio`` (normal / used bits)
        and ``optimal_ratio`` (normal / optimal bits); the encoder's count its stored units. None for baselines."""
        stats = self.memory_stats()
        if stats is None:
            return None
        return {side: {"actual_ratio": s.actual_ratio, "optimal_ratio": s.optimal_ratio} for side, s in stats.sides()}
