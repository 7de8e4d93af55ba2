"""LanguageModel (LightningModule) end to end: fits, memory, truncated BPTT, modes, checkpoints, metrics."""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from module_state import assert_same_state, module_state  # tests/ (conftest puts it on the path)
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_revrnn import MemoryAccounting, ReversibleRNN
from lightning_revrnn.core.protocol import CHUNK
from lightning_revrnn.datamodules import CopyTasksDataModule, SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel
from lightning_revrnn.lm.model import RnnType
from lightning_revrnn.memory import saved_tensor_bytes

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*self.log\\(\\).*trainer. reference is not registered.*"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*defined a `validation_step` but have no `val_dataloader`.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
]

REVERSIBLE = ["revgru", "revlstm", "nfrevgru", "nfrevlstm"]
BASELINES = ["gru", "lstm"]
VOCAB = 16
NO_DROPOUT: dict[str, Any] = dict(
    dropout_emb=0.0, dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0, dropconnect=0.0
)


def make_model(
    rnn: str = "revgru", num_layers: int = 1, vocab: int = VOCAB, seed: int = 0, **kwargs: Any
) -> LanguageModel:
    """A tiny LanguageModel with deterministic initialisation and a gentle optimiser."""
    torch.manual_seed(seed)
    kwargs.setdefault("optimizer", partial(torch.optim.SGD, lr=0.5))
    rnn_type = cast(RnnType, rnn)  # a test's parameter (a string); the model validates it
    return LanguageModel(vocab, rnn=rnn_type, num_layers=num_layers, emb_size=16, hidden_size=24, **kwargs)


def make_data(**kwargs: Any) -> SyntheticLMDataModule:
    args: dict[str, Any] = dict(
        vocab_size=VOCAB, train_tokens=2000, val_tokens=400, test_tokens=400, batch_size=4, eval_batch_size=4, bptt=10
    )
    args.update(kwargs)
    return SyntheticLMDataModule(**args)


def make_trainer(**kwargs: Any) -> pl.Trainer:
    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


def flat(state: Any) -> list[Tensor]:
    """The tensors of a nested state (tensor / list / tuple), in order."""
    if isinstance(state, Tensor):
        return [state]
    return [t for s in state for t in flat(s)]


def batches(dm: pl.LightningDataModule, split: str = "train", stage: str = "fit") -> list[dict[str, Any]]:
    dm.setup(stage)
    loader = {"train": dm.train_dataloader, "valid": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return list(loader)


class LossRecorder(Callback):
    """Records ``(epoch, batch_idx, loss)`` of every training batch."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, int, Tensor]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append((trainer.current_epoch, batch_idx, outputs["loss"].detach().clone()))


# ------------------------------------------------------------------------------------------------ fits
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("rnn", REVERSIBLE + BASELINES)
def test_fit_every_rnn_type(rnn: str, num_layers: int) -> None:
    pl.seed_everything(0, verbose=False)
    model = make_model(rnn, num_layers)
    recorder = LossRecorder()
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, callbacks=[recorder])
    trainer.fit(model, make_data())
    assert trainer.global_step == 3
    assert len(recorder.losses) == 3
    assert all(torch.isfinite(loss) for *_, loss in recorder.losses)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    val_ppl = trainer.callback_metrics["val_ppl"]
    if rnn.startswith("nf"):
        # no-forgetting models' states grow without bound over the validation stream, so the perplexity
        # of a barely trained model may overflow float32; it must still be a number
        assert not torch.isnan(val_ppl) and val_ppl > 1
    else:
        assert torch.isfinite(val_ppl) and val_ppl > 1
    stats = model.memory_stats()
    if rnn in REVERSIBLE:
        assert isinstance(stats, MemoryAccounting)
        assert len(stats.layers) == num_layers
        assert stats.normal_bits > 0
        if rnn.startswith("nf"):
            assert stats.used_bits == 0  # additive coupling only: nothing to buffer
        else:
            assert stats.used_bits > 0
            assert stats.actual_ratio == pytest.approx(stats.normal_bits / stats.used_bits)
    else:
        assert stats is None


# ---------------------------------------------------------------------------------------------- memory
def _saved_bytes_per_step(rnn: str, B: int, V: int) -> float:
    sizes = []
    for T in (20, 80):
        model = make_model(rnn, num_layers=2, vocab=V)
        gen = torch.Generator(torch.get_default_device()).manual_seed(T)
        batch = {
            "inputs": torch.randint(V, (T, B), generator=gen),
            "targets": torch.randint(V, (T, B), generator=gen),
            "reset": True,
        }
        with saved_tensor_bytes(exclude=model.parameters()) as saved:
            loss = model.training_step(batch, 0)
        loss.backward()  # the graph is consistent (and frees the buffers)
        sizes.append(saved.total)
    return (sizes[1] - sizes[0]) / 60


@pytest.mark.parametrize("rnn", ["revgru", "revlstm", "gru"])
def test_reversible_training_keeps_no_logits(rnn: str) -> None:
    B, V = 8, 50
    logits_per_step = B * V * 4
    growth = _saved_bytes_per_step(rnn, B, V)
    if rnn in REVERSIBLE:
        assert growth < logits_per_step / 4, (growth, logits_per_step)
    else:
        assert growth >= logits_per_step, (growth, logits_per_step)


# ------------------------------------------------------------------------------------ truncated BPTT
@pytest.mark.parametrize("rnn", ["revgru", "revlstm", "nfrevgru", "gru", "lstm"])
def test_carried_state_equals_explicit_run(rnn: str) -> None:
    model = make_model(rnn, num_layers=2, **NO_DROPOUT)
    b = batches(make_data())
    assert b[0]["reset"] and not b[1]["reset"]
    model.train()
    model.training_step(b[0], 0)
    after_first = flat(model._hidden["train"])
    model.training_step(b[1], 1)
    carried = flat(model._hidden["train"])
    assert all(t.grad_fn is None and not t.requires_grad for t in carried)

    model.eval()
    embed = model.stem.bind(training=False)
    with torch.no_grad():
        _, h0 = model.rnn(embed(b[0]["inputs"]))
        _, h1 = model.rnn(embed(b[1]["inputs"]), h0)
        _, h01 = model.rnn(embed(torch.cat([b[0]["inputs"], b[1]["inputs"]])))
    if rnn in REVERSIBLE:  # the model carries the exact (float64) state; h_n is its float32 rounding
        assert isinstance(model.rnn, ReversibleRNN)
        h0, h1, h01 = (model.rnn.exact_state(h) for h in (h0, h1, h01))
        for got, want in zip(after_first, flat(h0), strict=True):
            assert torch.equal(got, want)
        for got, want in zip(carried, flat(h1), strict=True):
            assert torch.equal(got, want)
        if rnn.startswith("nf"):
            # Without forgetting there is no buffer, so windows compose into one long run (the forgetting models start
            # each window with an empty information buffer, whose bits enter the state, so for them only the window-by-
            # window run above is bit-identical). Exactly only where the first layer's input GEMMs have the same shapes:
            # with bptt 10 the second window's steps 10-19 fall in the long run's CHUNK-step chunks from step 8 (4-step
            # chunks: 8-11, 12-15, 16-19), but in chunks of their own from step 10, and a BLAS may round a GEMM over a
            # different row count differently in the last bit. Then each half update h ← h + round(add) differs by at
            # most 2 units of 2^-23 directly, 2 updates per layer and step: 2 layers × 20 steps give ≤ 160 units; twice
            # that for propagation through later gates (Lipschitz ≲ 1 here): 320 units ≈ 3.8e-5. A lost or wrong carry
            # moves the state by O(0.1).
            for got, whole in zip(carried, flat(h01), strict=True):
                torch.testing.assert_close(got, whole, rtol=0, atol=320 * 2.0**-23)
            # Windows of CHUNK steps each start on a chunk boundary: the same GEMMs on the same shapes.
            tokens = torch.cat([batch["inputs"] for batch in b[:4]])[: 2 * CHUNK]
            with torch.no_grad():
                _, first = model.rnn(embed(tokens[:CHUNK]))
                _, split = model.rnn(embed(tokens[CHUNK:]), first)
                _, whole = model.rnn(embed(tokens))
            for got, want in zip(flat(model.rnn.exact_state(split)), flat(model.rnn.exact_state(whole)), strict=True):
                assert torch.equal(got, want)
    else:
        for got, want, whole in zip(carried, flat(h1), flat(h01), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
    # the carried state is not the state of the second window alone
    with torch.no_grad():
        _, alone = model.rnn(embed(b[1]["inputs"]))
    assert not all(torch.equal(a, c) for a, c in zip(flat(alone), carried))


@pytest.mark.parametrize("rnn", ["revgru", "lstm"])
def test_state_resets_on_reset_flag(rnn: str) -> None:
    model = make_model(rnn, **NO_DROPOUT)
    b = batches(make_data())
    model.training_step(b[0], 0)
    model.training_step(b[1], 1)
    restarted = dict(b[2], reset=True)
    model.training_step(restarted, 2)
    fresh = make_model(rnn, **NO_DROPOUT)
    fresh.training_step(restarted, 0)
    for got, want in zip(flat(model._hidden["train"]), flat(fresh._hidden["train"]), strict=True):
        assert torch.equal(got, want)
    continued = make_model(rnn, **NO_DROPOUT)
    continued.training_step(b[0], 0)
    continued.training_step(b[1], 1)
    continued.training_step(b[2], 2)
    assert not all(torch.equal(a, c) for a, c in zip(flat(model._hidden["train"]), flat(continued._hidden["train"])))


class _NeverReset(pl.LightningDataModule):
    """Windows of a synthetic corpus with ``reset`` always False (so only the epoch start resets)."""

    def __init__(self) -> None:
        super().__init__()
        self.items = [dict(b, reset=False) for b in batches(make_data())[:3]]

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.items, batch_size=None)  # type: ignore[arg-type]  # a list is a map-style dataset (__getitem__, __len__); typeshed wants Dataset


class _StateProbe(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int, list[Tensor] | None]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert isinstance(pl_module, LanguageModel)
        state = pl_module._hidden.get("train")
        self.seen.append((trainer.current_epoch, batch_idx, None if state is None else flat(state)))


def test_state_resets_at_epoch_start_and_is_detached() -> None:
    model = make_model("revgru", **NO_DROPOUT)
    probe = _StateProbe()
    trainer = make_trainer(max_epochs=2, callbacks=[probe], limit_val_batches=0)
    trainer.fit(model, _NeverReset())
    assert [(e, i) for e, i, _ in probe.seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for epoch, idx, state in probe.seen:
        if idx == 0:
            assert state is None, f"state carried into epoch {epoch}"
        else:
            assert state is not None
            assert all(t.grad_fn is None and not t.requires_grad for t in state)


# ---------------------------------------------------------------------------------- reverse vs store
@pytest.mark.parametrize("rnn", ["revgru", "revlstm"])
def test_reverse_and_store_modes_agree_with_dropout(rnn: str) -> None:
    reverse = make_model(
        rnn, num_layers=2, dropout_emb=0.2, dropout_input=0.3, dropout_hidden=0.3, dropout_output=0.3, dropconnect=0.4
    )
    store = copy.deepcopy(reverse)
    assert isinstance(store.rnn, ReversibleRNN)
    store.rnn.mode = "store"
    assert reverse.rnn.mode == "reverse"
    b = batches(make_data())[0]
    losses, grads = [], []
    for model in (reverse, store):
        model.train()
        loss = model.training_step(b, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)
    # the dropout masks do matter: without dropout the loss is different
    clean = copy.deepcopy(reverse)
    for module in (clean.stem, clean.head):
        module.dropout = 0.0
    assert isinstance(clean.rnn, ReversibleRNN)
    clean.rnn.dropout = clean.rnn.input_dropout = clean.rnn.dropconnect = 0.0
    assert not torch.allclose(clean.training_step(b, 0).detach(), losses[0])


def test_store_mode_constructor_argument() -> None:
    model = make_model("revgru", mode="store")
    assert model.rnn.mode == "store" and model.hparams["mode"] == "store"


# ------------------------------------------------------------------------------- bound stem and head
@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_bind_leaves_nothing_on_the_stem_and_head(rnn: str) -> None:
    """A window's masks and targets live on the bound stem and head only: binding, a training step with its
    backward and an evaluation step leave the model's stem and head (and their submodules) as they were."""
    model = make_model(rnn, dropout_emb=0.2, dropout_output=0.3)
    before = {"stem": module_state(model.stem), "head": module_state(model.head)}
    b = batches(make_data())[0]
    stem, head = model.stem.bind(training=True), model.head.bind(b["targets"], training=True)
    assert stem.word_mask is not None and head.mask is not None and head.targets is b["targets"]
    model.train()
    model.training_step(b, 0).backward()
    model.eval()
    with torch.no_grad():
        model.validation_step(b, 0)
    model.train()  # back to the mode it was built in
    assert_same_state(before["stem"], module_state(model.stem))
    assert_same_state(before["head"], module_state(model.head))
    # the bound modules hold the model's own parameters (the tied weight once), not copies
    assert [id(p) for p in stem.parameters()] == [id(model.embedding.weight)]
    assert [id(p) for p in head.parameters()] == [id(model.embedding.weight), id(model.decoder.bias)]


def test_two_bound_heads_coexist() -> None:
    """Two windows bound at once (different targets and masks), run forward one after the other and
    backpropagated in the other order, each get the loss and gradients they get alone."""
    model = make_model("revgru", num_layers=2, dropout_emb=0.2, dropout_output=0.3).train()
    b = batches(make_data())[0]
    tokens, targets = b["inputs"], b["targets"]
    other = torch.roll(targets, 1, dims=0)
    params = list(model.parameters())

    def bound(t: Tensor, seed: int) -> tuple[Any, Any]:
        torch.manual_seed(seed)
        return model.stem.bind(training=True), model.head.bind(t, training=True)

    def forward(stem: Any, head: Any) -> Tensor:
        torch.manual_seed(7)  # the RNN's own masks, the same for every run
        return model.window_loss(tokens, None, stem, head)[0]

    alone = []
    for t, seed in ((targets, 1), (other, 2)):
        loss = forward(*bound(t, seed))
        alone.append((loss.detach(), torch.autograd.grad(loss, params)))
    first, second = bound(targets, 1), bound(other, 2)
    assert not torch.equal(first[1].mask, second[1].mask)
    losses = [forward(*first), forward(*second)]
    grads = [torch.autograd.grad(losses[1], params), torch.autograd.grad(losses[0], params)][::-1]
    for (want_loss, want_grads), loss, got in zip(alone, losses, grads, strict=True):
        assert torch.equal(loss.detach(), want_loss)
        for a, w in zip(got, want_grads, strict=True):
            assert torch.equal(a, w)
    assert not torch.equal(alone[0][0], alone[1][0])


# ------------------------------------------------------------------------ accumulation and clipping
class _NormProbe(Callback):
    """Gradient norm before clipping, once per optimizer step (Lightning clips after this hook)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.norms.append(_grad_norm(pl_module))


def _grad_norm(module: torch.nn.Module) -> float:
    return float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
    )


class _ClippedSGD(torch.optim.SGD):
    """SGD recording the gradient norm it actually steps with (after Lightning's clipping)."""

    stepped: ClassVar[list[float]] = []

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # Lightning clips inside the closure, after backward
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        type(self).stepped.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        super().step()
        return loss


@pytest.mark.parametrize("rnn", ["revgru", "nfrevlstm"])
def test_gradient_accumulation_and_clipping(rnn: str) -> None:
    _ClippedSGD.stepped = []
    model = make_model(rnn, num_layers=2, optimizer=partial(_ClippedSGD, lr=0.5))
    before = copy.deepcopy(model.state_dict())
    probe, recorder = _NormProbe(), LossRecorder()
    trainer = make_trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        accumulate_grad_batches=2,
        gradient_clip_val=0.1,
        callbacks=[probe, recorder],
    )
    trainer.fit(model, make_data())
    assert len(recorder.losses) == 4 and all(torch.isfinite(l) for *_, l in recorder.losses)
    assert trainer.global_step == 2  # 4 batches / 2 accumulated
    assert len(probe.norms) == len(_ClippedSGD.stepped) == 2
    assert all(n > 0.1 for n in probe.norms), probe.norms  # clipping had something to do
    assert all(n <= 0.1 * (1 + 1e-4) for n in _ClippedSGD.stepped), _ClippedSGD.stepped
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_accumulated_gradient_is_mean_of_micro_batches() -> None:
    """Two accumulated micro-batches give the mean of their gradients (state carried between them)."""
    model = make_model("revgru", **NO_DROPOUT)
    reference = copy.deepcopy(model)
    b = batches(make_data())[:2]
    grads: dict[str, Tensor] = {}

    class _Grab(Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    class _Two(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(b, batch_size=None)  # type: ignore[arg-type]  # a list is a map-style dataset (__getitem__, __len__); typeshed wants Dataset

    trainer = make_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[_Grab()])
    trainer.fit(model, _Two())
    reference.zero_grad()
    for i, batch in enumerate(b):
        (reference.training_step(batch, i) / 2).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------- checkpoints
def test_hparams_restored_and_model_checkpoint_on_val_ppl(tmp_path: Path) -> None:
    model = make_model("revlstm", num_layers=2, max_forget_bits=5, dropout_output=0.25, mode="store", seed=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_ppl", mode="min", save_top_k=1)
    trainer = make_trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=2, callbacks=[ckpt], enable_checkpointing=True
    )
    trainer.fit(model, make_data())
    assert ckpt.best_model_path and Path(ckpt.best_model_path).is_file()
    assert ckpt.best_model_score is not None and math.isfinite(float(ckpt.best_model_score))
    loaded = LanguageModel.load_from_checkpoint(ckpt.best_model_path)
    for key in (
        "vocab_size",
        "rnn",
        "num_layers",
        "emb_size",
        "hidden_size",
        "max_forget_bits",
        "dropout_output",
        "mode",
        "seed",
    ):
        assert loaded.hparams[key] == model.hparams[key], key
    assert loaded.hparams["rnn"] == "revlstm" and loaded.hparams["max_forget_bits"] == 5
    assert loaded.rnn.mode == "store" and loaded.rnn.num_layers == 2
    assert "optimizer" not in loaded.hparams
    # the weights are the checkpoint's
    state = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name


def _first_batch_of_epoch(recorder: LossRecorder, epoch: int) -> Tensor:
    return next(loss for e, i, loss in recorder.losses if e == epoch and i == 0)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_from_checkpoint_continues_the_run(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = dict(limit_train_batches=4, limit_val_batches=2)
    drop: dict[str, Any] = dict(
        dropout_emb=0.1, dropout_input=0.2, dropout_hidden=0.2, dropout_output=0.2, dropconnect=0.3
    )

    whole = LossRecorder()
    trainer = make_trainer(max_epochs=2, callbacks=[whole], **kwargs)
    trainer.fit(make_model("revgru", num_layers=2, **drop), make_data())
    expected = _first_batch_of_epoch(whole, 1)

    ckpt, head = ModelCheckpoint(dirpath=tmp_path, save_last=True), LossRecorder()
    first = make_trainer(max_epochs=1, callbacks=[ckpt, head], enable_checkpointing=True, **kwargs)
    first.fit(make_model("revgru", num_layers=2, **drop), make_data())
    for (_, _, a), (_, _, b) in zip(head.losses, whole.losses[:4], strict=True):  # same run so far
        assert torch.equal(a, b)
    path = tmp_path / "last.ckpt"
    assert path.is_file()

    resumed = LossRecorder()
    # the same ModelCheckpoint configuration as the interrupted run, so its state is restored too
    again = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    second = make_trainer(max_epochs=2, callbacks=[resumed, again], enable_checkpointing=True, **kwargs)
    second.fit(make_model("revgru", num_layers=2, seed=123, **drop), make_data(), ckpt_path=str(path))
    assert [e for e, *_ in resumed.losses] == [1] * 4  # only epoch 2 ran
    # bit-identical: same weights, optimizer and scheduler state, global step (hence dropout masks), data
    # (the sanity validation of the resumed fit touches only the validation state, so it stays on)
    got = _first_batch_of_epoch(resumed, 1)
    assert torch.equal(got, expected), (got, expected)
    for (_, i, a), (_, j, b) in zip(resumed.losses, [r for r in whole.losses if r[0] == 1], strict=True):
        assert i == j and torch.equal(a, b)


# -------------------------------------------------------------------------------------------- metrics
def _perplexity_by_hand(model: LanguageModel, items: list[dict[str, Any]]) -> float:
    model.eval()
    total, count, hx = 0.0, 0, None
    with torch.no_grad():
        for item in items:
            if item["reset"]:
                hx = None
            out, hx = model.rnn(model.embedding(item["inputs"]), hx)
            logits = model.decoder(out)
            targets = item["targets"]
            total += float(
                F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), ignore_index=-100, reduction="sum")
            )
            count += int((targets != -100).sum())
    return math.exp(total / count)


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_val_and_test_perplexity_match_hand_computation(rnn: str) -> None:
    model = make_model(rnn, num_layers=2)
    dm = make_data()
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=3)
    trainer.fit(model, dm)
    val = trainer.validate(model, dm, verbose=False)[0]["val_ppl"]
    limit = 3
    val_items = batches(make_data(), "valid")[:limit]
    assert float(trainer.callback_metrics["val_ppl"]) == pytest.approx(val)
    assert val == pytest.approx(_perplexity_by_hand(model, val_items), rel=1e-4)

    test_trainer = make_trainer()
    test = test_trainer.test(model, dm, verbose=False)[0]["test_ppl"]
    test_items = batches(make_data(), "test", "test")
    assert test == pytest.approx(_perplexity_by_hand(model, test_items), rel=1e-4)
    assert val != pytest.approx(test, rel=1e-6)  # different data, different number


def test_copy_task_ignores_unset_targets() -> None:
    dm = CopyTasksDataModule("repeat", vocab_size=8, seq_len=10, batch_size=4, train_batches=4, val_batches=2)
    model = make_model("revgru", vocab=8, **NO_DROPOUT)
    item = batches(dm)[0]
    assert (item["targets"] == -100).any()
    loss = model.training_step(item, 0)
    with torch.no_grad():
        out, _ = model.rnn(model.embedding(item["inputs"]))
        want = F.cross_entropy(model.decoder(out).flatten(0, 1), item["targets"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    recorder = LossRecorder()
    trainer = make_trainer(max_epochs=1, callbacks=[recorder])
    trainer.fit(make_model("revgru", vocab=8), dm)
    assert len(recorder.losses) == 4 and all(torch.isfinite(l) for *_, l in recorder.losses)
    assert math.isfinite(float(trainer.callback_metrics["val_ppl"]))
