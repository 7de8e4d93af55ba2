"""TranslationModel: reverse-mode gradients equal store-mode ones for the whole model (every attention
context, both reversible cells, padded batches), padding leaves final states alone, decoding runs on the
exact state, memory accounting per side, and Lightning fit / validate / test / predict for every rnn type."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_revrnn import ReversibleRNN
from lightning_revrnn.core.rnn import Mode
from lightning_revrnn.translation.decoder_state import DecoderState
from lightning_revrnn.translation.decoding import beam_search, greedy_search
from lightning_revrnn.translation.encoder import STORED_UNIT_BITS
from lightning_revrnn.translation.model import TranslationModel

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from module_state import assert_same_state, module_state
from seq2seq_helpers import grads_of, padded_batch, synthetic_data, tiny_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
]

CONTEXTS = ["slice", "emb", "emb+slice", "hidden"]
REVERSIBLE = ["revgru", "revlstm"]
ALL_RNNS = ["revgru", "revlstm", "gru", "lstm"]
#: Sources of 1-7 tokens and targets of 1-9 (+EOS) in one padded batch.
SRC_LENGTHS, TGT_LENGTHS = [7, 1, 4, 6], [9, 2, 6, 1]
#: Targets crossing the CHUNK boundaries (every 4 steps) of the decoder's sweep.
LONG_TGT_LENGTHS = [17, 2, 9, 1]


def _loss_and_grads(
    model: TranslationModel, mode: Mode, tgt_lengths: list[int] = TGT_LENGTHS
) -> tuple[Tensor, dict[str, Tensor]]:
    assert isinstance(model.encoder, ReversibleRNN) and isinstance(model.decoder, ReversibleRNN)
    model.encoder.mode = model.decoder.mode = mode
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both modes
    loss = model.summed_loss(padded_batch(SRC_LENGTHS, tgt_lengths, 13))
    loss.backward()
    return loss.detach(), grads_of(model)


def _assert_close(got: Tensor, want: Tensor, name: str) -> None:
    """Reverse and store compute the same float32 gradients with sums associated differently (per step
    instead of per chunk, one accumulator instead of autograd's): a sum of n <= T·B·H ~ 10^3 terms differs by
    at most ~n·2^-24 ~ 6e-5 of the terms' magnitude, so rtol 1e-4 with an absolute floor of 1e-5 of the
    largest element (for elements that cancel to ~0); a missing or doubled contribution is off by O(1)."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12, msg=name)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("rnn", REVERSIBLE)
def test_reverse_gradients_equal_store_for_the_whole_model(rnn: str, context: str) -> None:
    """With dropout on (same masks in both modes), padded sources and targets; reverse mode also rebuilds
    every state bit for bit, or its backward raises ReconstructionError."""
    model = tiny_model(rnn, context=context, dropout=0.3).train()
    loss_s, grads_s = _loss_and_grads(model, "store")
    loss_r, grads_r = _loss_and_grads(model, "reverse")
    # The same RNN states in both modes (reverse mode checks them bit for bit against forward's checksums), but the
    # attention head's value comes from two implementations: blockwise over source positions in the sweep's
    # forward (no graph), plain autograd attention in store mode. They associate sums differently, so the losses
    # agree to float tolerance, not bit for bit (they did on some CPUs' kernels and chunk lengths, by chance).
    _assert_close(loss_r, loss_s, "loss")
    assert set(grads_r) == set(grads_s)
    for name in grads_s:
        _assert_close(grads_r[name], grads_s[name], name)
    # the gradient reaches the encoder through the decoder's initial state and (but for "emb") the memory
    assert float(grads_r["encoder.cells.0.weight_ih"].abs().sum()) > 0
    assert float(grads_r["src_embedding.weight"].abs().sum()) > 0
    assert float(grads_r["head.attention.query.weight"].abs().sum()) > 0


def test_two_layer_revlstm_reverse_equals_store_across_chunks() -> None:
    model = tiny_model("revlstm", num_layers=2, context="emb+slice", dropout=0.3).train()
    loss_s, grads_s = _loss_and_grads(model, "store", LONG_TGT_LENGTHS)
    loss_r, grads_r = _loss_and_grads(model, "reverse", LONG_TGT_LENGTHS)
    _assert_close(loss_r, loss_s, "loss")  # two attention implementations: see the test above
    for name in grads_s:
        _assert_close(grads_r[name], grads_s[name], name)
    assert float(grads_r["encoder.cells.0.weight_hh"].abs().sum()) > 0


def test_attention_gradient_reaches_the_stored_slice() -> None:
    """Without the decoder's initial state (zeroed), the encoder learns only through the attended slice."""
    model = tiny_model("revgru", context="slice", dropout=0.0).train()
    batch = padded_batch(SRC_LENGTHS, TGT_LENGTHS, 13)
    stored, h_n = model.encode(batch.src, batch.src_keep)
    assert stored is not None and stored.shape == (7, 4, 3)
    head = model.head.bind(stored, batch.src, batch.src_keep, batch.tgt_out, batch.tgt_keep, True)
    stem = model.tgt_stem.bind(training=True)
    loss, _ = model.decoder(batch.tgt_in, h_n * 0, head=head, stem=stem, keep=batch.tgt_keep)
    loss.backward()
    assert float(model.encoder.cells[0].weight_ih.grad.abs().sum()) > 0


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_bind_leaves_nothing_on_the_head_and_stems(rnn: str) -> None:
    """A window's memory sources, targets and masks live on the bound head only: a training step with its
    backward and an evaluation loss leave the model's head and stems as they were (nothing to release), and
    the bound head's parameters are the head's own."""
    model = tiny_model(rnn, dropout=0.3).train()
    modules = {"head": model.head, "src_stem": model.src_stem, "tgt_stem": model.tgt_stem}
    before = {name: module_state(m) for name, m in modules.items()}
    batch = padded_batch(SRC_LENGTHS, TGT_LENGTHS, 13)
    model.summed_loss(batch).backward()
    model.eval()
    with torch.no_grad():
        model.summed_loss(batch)
    model.train()
    for name, module in modules.items():
        assert_same_state(before[name], module_state(module))
    stored, _ = model.encode(batch.src, batch.src_keep)
    bound = model.head.bind(stored, batch.src, batch.src_keep, batch.tgt_out, batch.tgt_keep, True)
    assert [id(p) for p in bound.parameters()] == [id(p) for p in model.head.parameters()]
    assert bound.memory_mask is not None and bound.output_mask is not None


def test_two_bound_windows_coexist() -> None:
    """Two windows run forward one after the other and backpropagated in the other order (each decoder's
    reverse sweep runs its own bound head after the other window was bound) get the gradients they get alone."""
    model = tiny_model("revgru", dropout=0.3).train()
    params = list(model.parameters())
    batches = [
        padded_batch(SRC_LENGTHS, TGT_LENGTHS, 13, seed=0),
        padded_batch(SRC_LENGTHS, LONG_TGT_LENGTHS, 13, seed=1),
    ]

    def loss_of(i: int) -> Tensor:
        torch.manual_seed(i)
        return model.summed_loss(batches[i])

    alone = [torch.autograd.grad(loss_of(i), params, allow_unused=True) for i in (0, 1)]
    losses = [loss_of(0), loss_of(1)]
    together = [torch.autograd.grad(losses[i], params, allow_unused=True) for i in (1, 0)][::-1]
    for got, want in zip(together, alone, strict=True):
        for a, w in zip(got, want, strict=True):
            assert (a is None and w is None) or torch.equal(a, w)


@pytest.mark.parametrize("rnn", ALL_RNNS)
def test_padding_leaves_each_sources_final_state_alone(rnn: str) -> None:
    """Every example's encoder final state in a padded batch equals the state of that sentence encoded alone
    (reversible: the keep mask; baselines: packed sequences), and padded steps give it no gradient."""
    model = tiny_model(rnn, context="slice").eval()
    batch = padded_batch(SRC_LENGTHS, TGT_LENGTHS, 13)
    with torch.no_grad():
        _, h_batch = model.encode(batch.src, batch.src_keep)
        for b, n in enumerate(SRC_LENGTHS):
            src = batch.src[:n, b : b + 1]
            _, h_alone = model.encode(src, torch.ones_like(src, dtype=torch.bool))
            for got, want in zip(_flat(h_batch), _flat(h_alone)):
                torch.testing.assert_close(got[..., b : b + 1, :], want, rtol=0, atol=PADDING_TOL)


#: Batch of 4 against batch of 1: a BLAS may round a GEMM over another row count differently in the last bit;
#: a one-ulp pre-activation can move a fixed-point update by 2^-23 and, through a buffered multiplication,
#: inject up to 2^-13 into the state (as in tests/test_ddp.py). Padding taken as steps would move the state by
#: O(0.1) (measured differences: <= 2.4e-7).
PADDING_TOL = 2.0**-10


def _flat(state: object) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    return [t for s in state for t in _flat(s)]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("rnn", ALL_RNNS)
def test_beam_one_equals_greedy_on_the_model(rnn: str) -> None:
    model = tiny_model(rnn, vocab=13).eval()
    batch = padded_batch(SRC_LENGTHS, TGT_LENGTHS, 13)
    common = dict(batch=4, bos=2, eos=3, max_len=12)
    with torch.no_grad():
        greedy = greedy_search(
            model.decode_step, model.initial_decoder_state(batch.src, batch.src_keep), DecoderState.select, **common
        )
        beam1 = beam_search(
            model.decode_step,
            model.initial_decoder_state(batch.src, batch.src_keep),
            DecoderState.select,
            beam=1,
            **common,
        )
    assert beam1 == greedy
    assert model.translate(batch.src, batch.src_keep, beam=1) == greedy
    assert len(greedy) == 4 and all(len(ids) <= 12 for ids in greedy)
    beam3 = model.translate(batch.src, batch.src_keep, beam=3)
    assert len(beam3) == 4


@pytest.mark.parametrize("rnn", REVERSIBLE)
def test_decoding_steps_carry_the_exact_state(rnn: str) -> None:
    """Stepping the decoder token by token from the exact encoder state gives the teacher-forced evaluation
    log-probabilities (same fixed-point recurrence; only the chunked input projection may round differently),
    and the carried state is float64 (exact), also after a beam reordering. PAD and BOS are masked out."""
    model = tiny_model(rnn, context="emb+slice").eval()
    batch = padded_batch([5, 5], [6, 6], 13)
    state = model.initial_decoder_state(batch.src, batch.src_keep)
    with torch.no_grad():
        _, h_n = model.encode(batch.src, batch.src_keep)
        # teacher forcing, all steps at once, no head: the decoder outputs
        outputs, _ = model.decoder(batch.tgt_in, h_n, stem=model.tgt_stem.bind(training=False))
        want = model.head.log_probs(outputs, state.memory, state.memory_keep)
        for t in range(batch.tgt_in.shape[0]):
            log_probs, state = model.decode_step(batch.tgt_in[t], state)
            torch.testing.assert_close(log_probs[:, 4:], want[t][:, 4:], rtol=1e-5, atol=1e-5)
            assert bool((log_probs[:, [0, 2]] == float("-inf")).all())  # PAD and BOS are never generated
            assert all(h.dtype == torch.float64 for h in _flat(state.hidden))
        swapped = state.select(torch.tensor([1, 0]))
        for a, b in zip(_flat(swapped.hidden), _flat(state.hidden)):
            assert torch.equal(a[:, 0], b[:, 1])


# ----------------------------------------------------------------------------------------- accounting
def test_encoder_accounting_adds_the_stored_slice() -> None:
    """The encoder's used and optimal bits include 32 bits per stored unit and (padded) source step."""
    model = tiny_model("revgru", context="emb+slice").train()
    batch = padded_batch(SRC_LENGTHS, TGT_LENGTHS, 13)
    model.summed_loss(batch).backward()
    encoder = model.memory_stats().encoder
    S, B = batch.src.shape
    assert encoder.stored_bits == STORED_UNIT_BITS * 3 * S * B
    buffered = encoder.used_bits - encoder.stored_bits
    assert buffered > 0
    assert encoder.actual_ratio == pytest.approx(encoder.normal_bits / encoder.used_bits)
    assert encoder.layers[-1].stored_bits == encoder.stored_bits
    summary = model.memory_summary()
    assert summary is not None and set(summary) == {"encoder", "decoder"}
    assert summary["decoder"]["actual_ratio"] > summary["encoder"]["actual_ratio"] > 1
    assert tiny_model("gru").memory_summary() is None


def test_hidden_context_saves_nothing_in_the_encoder() -> None:
    """Attending over the whole state stores it all: the encoder's ratio falls to at most 1 (the paper's 300H)."""
    model = tiny_model("revgru", context="hidden").train()
    model.summed_loss(padded_batch(SRC_LENGTHS, TGT_LENGTHS, 13)).backward()
    assert model.memory_summary()["encoder"]["actual_ratio"] <= 1


# ------------------------------------------------------------------------------------------- settings
def test_defaults_follow_the_paper() -> None:
    assert tiny_model("revgru").context_type == "emb+slice"
    assert tiny_model("gru").context_type == "hidden"
    for rnn, lr in (("lstm", 1.0), ("revlstm", 0.5), ("gru", 0.2), ("revgru", 0.2)):
        optimizers = tiny_model(rnn).configure_optimizers()
        assert isinstance(optimizers, dict)
        optimizer = optimizers["optimizer"]
        assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == lr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rnn="rnn"), "rnn must be one of"),
        (dict(context="attention"), "context must be one of"),
        (dict(slice_dim=5), r"slice_dim=5 .* hidden_size // 2 = 4"),
        (dict(hidden_size=9), "hidden_size must be even"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)  # type: ignore[arg-type]


def test_without_vocabulary_sizes_or_datamodule_setup_says_what_to_do() -> None:
    model = tiny_model(vocab=None)
    with pytest.raises(RuntimeError, match="vocabulary sizes are unknown"):
        model.summed_loss(padded_batch([2], [2], 13))
    with pytest.raises(ValueError, match="has no src_vocab/tgt_vocab"):
        model.setup("fit")


# ------------------------------------------------------------------------------------------ Lightning
def _trainer(root: Path, **kwargs: object) -> pl.Trainer:
    args: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    args.update(kwargs)
    return pl.Trainer(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("rnn", ALL_RNNS)
def test_fit_validate_test_predict(rnn: str, tmp_path: Path) -> None:
    with torch.device("cpu"):  # a CPU Trainer and DataModule, also under REVRNN_TEST_DEVICE=cuda (make gpu-check)
        _fit_validate_test_predict(rnn, tmp_path)


def _fit_validate_test_predict(rnn: str, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    data = synthetic_data()
    out = tmp_path / "out.de"
    model = tiny_model(rnn, vocab=None, optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    trainer = _trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        gradient_clip_val=5.0,
    )
    trainer.fit(model, data)
    assert trainer.global_step == 2
    assert data.src_vocab is not None
    assert model.hparams["src_vocab_size"] == len(data.src_vocab) == 12  # 8 words + 4 specials
    metrics = trainer.callback_metrics
    for key in ("train_loss", "val_loss", "val_ppl", "val_bleu"):
        assert torch.isfinite(metrics[key]), key
    assert float(metrics["val_ppl"]) == pytest.approx(float(metrics["val_loss"].exp()), rel=1e-5)
    assert 1 < float(metrics["val_ppl"]) < 100
    trainer.save_checkpoint(tmp_path / "model.ckpt")

    # sizes and vocabularies are in the checkpoint; decoding settings are given anew
    reloaded = TranslationModel.load_from_checkpoint(tmp_path / "model.ckpt", beam=2, prediction_file=str(out))
    assert reloaded.tgt_vocab == data.tgt_vocab and reloaded.beam == 2
    validated = _trainer(tmp_path, limit_val_batches=1).validate(reloaded, data, verbose=False)[0]
    assert validated["val_ppl"] == pytest.approx(float(metrics["val_ppl"]), rel=1e-5)  # the same weights
    tested = _trainer(tmp_path).test(reloaded, data, verbose=False)[0]
    assert {"test_loss", "test_ppl", "test_bleu", "test_bleu_detok"} <= set(tested)
    assert 0 <= tested["test_bleu"] <= 100
    predictions = _trainer(tmp_path).predict(reloaded, data)
    lines = [line for batch in predictions for line in batch]  # type: ignore[union-attr]
    assert len(lines) == 12
    assert out.read_text(encoding="utf-8").splitlines() == lines
