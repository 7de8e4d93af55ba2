"""TranslationModel with data it cannot take: a zero-length source row is refused with an error naming the row
(decoding, training; reversible and baseline alike), and a non-finite training loss stops training before its
optimizer step, naming the step and the batch."""

from __future__ import annotations

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from seq2seq_helpers import padded_batch, tiny_model  # tests/ (conftest puts it on the path)
from torch.utils.data import DataLoader

from lightning_revrnn.shared import NonFiniteLossError

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl.*"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*is smaller than the logging interval.*"),
]

RNNS = ["revgru", "revlstm", "gru", "lstm"]
VOCAB = 13


def _with_empty_row(row: int, batch: int = 4) -> Any:
    lengths = [5, 3, 4, 2][:batch]
    out = padded_batch(lengths, [3, 4, 2, 3][:batch], VOCAB, seed=1)
    out.src_keep[:, row] = False  # a zero-length source row
    return out


def _trainer(**kwargs: Any) -> pl.Trainer:
    args: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=5.0,
    )
    args.update(kwargs)
    return pl.Trainer(**args)


def _loader(batches: list[Any]) -> DataLoader[Any]:
    """Ready batches, one per step (a list is a map-style dataset; ``batch_size=None`` serves them as they are)."""
    return DataLoader(batches, batch_size=None)  # type: ignore[arg-type]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("rnn", RNNS)
@pytest.mark.parametrize("beam", [1, 3])
def test_translate_refuses_a_zero_length_row_naming_it(rnn: str, beam: int) -> None:
    model = tiny_model(rnn)
    batch = _with_empty_row(2)
    with pytest.raises(ValueError, match=r"source row 2 of the batch \(1 of 4 rows.*no real token.*Fix:"):
        model.translate(batch.src, batch.src_keep, beam=beam)
    with pytest.raises(ValueError, match=r"source row 2 "):
        model.initial_decoder_state(batch.src, batch.src_keep)
    assert model.training  # the mode is restored
    whole = torch.zeros(0, 2, dtype=torch.long)  # no source position at all: every row is empty
    with pytest.raises(ValueError, match=r"source row 0, 1 of the batch \(2 of 2 rows"):
        model.translate(whole, whole.bool(), beam=beam)


@pytest.mark.parametrize("rnn", RNNS)
def test_training_refuses_a_zero_length_row_before_any_weight_changes(rnn: str) -> None:
    """A DataModule of one's own (not a TranslationDataModule) serving an empty source."""
    model = tiny_model(rnn)
    before = _state(model)
    good, bad = padded_batch([5, 3, 4, 2], [3, 4, 2, 3], VOCAB, seed=0), _with_empty_row(1)
    bad.indices = [10, 11, 12, 13]
    loader = _loader([good, bad])
    after_first: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            if batch_idx == 1:
                after_first.update(_state(pl_module))

    # the reversible path checks after its forward and names the pair; the baseline encoder before packing
    pair = r" \(pair 11 of its split\)" if model.reversible else ""
    with pytest.raises(ValueError, match=rf"source row 1{pair} of the batch \(1 of 4 rows"):
        _trainer(max_steps=4, callbacks=[Snapshot()]).fit(model, train_dataloaders=loader)
    state = _state(model)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after_first[k]) for k in before)  # the first step trained
    for key, value in after_first.items():
        assert torch.equal(state[key], value), key  # the refused step changed nothing


class _PoisonGenerator(Callback):
    """Makes the generator's bias NaN just before batch ``at`` (a stand-in for anything that makes one loss
    NaN), remembering every other parameter at that moment."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.state: dict[str, torch.Tensor] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.at:
            with torch.no_grad():
                pl_module.head.generator.bias.fill_(float("nan"))  # type: ignore[union-attr,operator]
            self.state = _state(pl_module)


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_a_nonfinite_training_loss_stops_before_the_optimizer_step(rnn: str) -> None:
    model = tiny_model(rnn)
    batches = [padded_batch([5, 3, 4, 2], [3, 4, 2, 3], VOCAB, seed=s) for s in range(4)]
    poison = _PoisonGenerator(at=2)
    with pytest.raises(
        NonFiniteLossError,
        match=r"TranslationModel: the training loss is nan at global step 2 "
        r"\(epoch 0, batch_idx 2\).*weights are still finite.*Fix: check that batch",
    ):
        _trainer(max_steps=6, callbacks=[poison]).fit(model, train_dataloaders=_loader(batches))
    state = _state(model)
    for key, value in poison.state.items():  # no optimizer step ran: every weight as the step found it
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        if key != "head.generator.bias":
            assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(embedding_size=0), "embedding_size=0"),
        (dict(embedding_size=-3), "embedding_size=-3"),
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(num_layers=0), "num_layers=0"),
        (dict(dropout=1.5), "dropout=1.5"),
    ],
)
def test_bad_sizes_name_the_argument(rnn: str, kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=rf"TranslationModel\({named}\): {named.split('=')[0]} must be"):
        tiny_model(rnn, **kwargs)


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_test_and_predict_refuse_a_zero_length_row_instead_of_nan(rnn: str) -> None:
    """A test loader of one's own with an empty source: an error, not test_loss nan / 100 x <unk>."""
    from lightning_revrnn.datamodules.translation import TranslationVocabulary

    model = tiny_model(rnn)
    vocab = TranslationVocabulary.build([[f"w{i}" for i in range(VOCAB - 4)]], 1, None)
    model.set_vocabularies(vocab, vocab)
    loader = _loader([padded_batch([5, 3, 4, 2], [3, 4, 2, 3], VOCAB), _with_empty_row(3)])
    with pytest.raises(ValueError, match=r"source row 3 "):
        _trainer().test(model, dataloaders=loader)
    with pytest.raises(ValueError, match=r"source row 3 "):
        _trainer().predict(model, dataloaders=loader)
