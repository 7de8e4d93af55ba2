"""LanguageModel: a non-finite training loss stops training before its optimizer step, naming the step and the
batch, instead of spreading NaN into every weight (and, for reversible models, failing a step later with an
unrelated fixed-point error)."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_revrnn import NonFiniteLossError
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel, RnnType

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*The number of training batches.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
]


class _PoisonDecoderBias(Callback):
    """Makes the decoder's bias NaN just before batch ``at`` (a stand-in for anything that makes one loss NaN),
    remembering the model's state at that moment."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.state: dict[str, torch.Tensor] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.at:
            with torch.no_grad():
                pl_module.decoder.bias.fill_(float("nan"))  # type: ignore[union-attr,operator]
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("rnn", ["revgru", "revlstm", "gru"])
def test_a_nonfinite_training_loss_stops_before_the_optimizer_step(rnn: RnnType) -> None:
    torch.manual_seed(0)
    model = LanguageModel(16, rnn=rnn, emb_size=16, hidden_size=24, optimizer=partial(torch.optim.SGD, lr=0.5))
    data = SyntheticLMDataModule(
        vocab_size=16, train_tokens=2000, val_tokens=400, test_tokens=400, batch_size=4, eval_batch_size=4, bptt=10
    )
    poison = _PoisonDecoderBias(at=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.25,
        callbacks=[poison],
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"LanguageModel: the training loss is nan at global step 3 \(epoch 0, "
        r"batch_idx 3\).*before this step's backward.*Fix: lower the learning rate",
    ):
        trainer.fit(model, data)
    state = model.state_dict()
    for key, value in poison.state.items():  # no optimizer step ran: every weight as the step found it
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        if not key.endswith("decoder.bias"):  # (the tied decoder's bias also appears as head.decoder.bias)
            assert not value.is_floating_point() or torch.isfinite(value).all(), key
