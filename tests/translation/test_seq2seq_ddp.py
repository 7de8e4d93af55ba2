"""TranslationModel under DistributedDataParallel (``ddp_spawn``, 2 CPU processes, gloo): the gradient of one
global batch split over two ranks equals one process's gradient of the whole batch.

The training loss divides the summed cross-entropy by the global number of target tokens (all-reduced) and
multiplies by the world size, so DDP's gradient average is the gradient of the global per-token mean;
dividing by each rank's own token count would weight the ranks' tokens differently."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

if str(Path(__file__).parent) not in sys.path:  # sibling helper modules (also imported by the spawned ranks)
    sys.path.insert(0, str(Path(__file__).parent))

from ddp_script import EndProcessGroup
from seq2seq_helpers import synthetic_data, tiny_model

from lightning_revrnn.datamodules.parallel import collate

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
    pytest.mark.filterwarnings("ignore:.*self.log\\(\\).*trainer. reference is not registered.*"),
]

GLOBAL_BATCH = 8
#: DDP vs one process, per gradient tensor: ``max|g_ddp - g_one| <= GRAD_TOL · max|g_one|``. As in
#: tests/test_ddp.py: each example's fixed-point trajectory is independent of its batchmates (drains are
#: decided per example, padding is masked), so the runs differ only where a BLAS rounds a GEMM over 4 rows
#: differently from one over 8 (and the ranks' sums are added in another order); a last-bit difference in a
#: pre-activation can move a buffered multiplication's rounding and inject up to 2^-13 into a state, so
#: gradients may differ by a few 2^-13 relative to their scale (measured here: at most 3e-7, round-off only).
#: 2^-8 leaves a wide margin, yet the gradient of one rank's pairs alone (a lost rank) is off by a large
#: fraction of max|g| (checked below; measured: 0.96 in the decoder bias).
GRAD_TOL = 2.0**-8


class GradSaver(Callback):
    """Saves the first optimizer step's (DDP-reduced) gradients and the batch's pair indices per rank."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.indices: list[int] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.indices = list(batch.indices)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step != 0:
            return
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        path = os.path.join(self.folder, f"grads-world{trainer.world_size}-rank{trainer.global_rank}.pt")
        torch.save({"grads": grads, "indices": self.indices}, path)


def _model(rnn: str) -> Any:
    """No dropout: masks are drawn per (seed, step, rank), so with dropout the ranks' masks differ by design."""
    return tiny_model(rnn, vocab=12, dropout=0.0, optimizer=partial(torch.optim.SGD, lr=0.1))  # picklable


def _one_step(folder: Path, rnn: str, devices: int, **kwargs: Any) -> None:
    spawn_end = [EndProcessGroup()] if kwargs.get("strategy") == "ddp_spawn" else []
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        max_steps=1,
        limit_train_batches=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GradSaver(str(folder)), *spawn_end],
        **kwargs,
    )
    trainer.fit(_model(rnn), synthetic_data(batch_size=GLOBAL_BATCH))


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name in sorted(want):
        scale = float(want[name].abs().max())
        error = float((got[name] - want[name]).abs().max())
        assert error <= GRAD_TOL * scale, f"{name}: max difference {error:.3g} > {GRAD_TOL:.3g} × max|g| {scale:.3g}"


@pytest.mark.parametrize("rnn", ["revgru"])
def test_ddp_spawn_gradients_equal_single_process(tmp_path: Path, clean_env: None, rnn: str) -> None:
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    _one_step(single_dir, rnn, devices=1)
    single = torch.load(single_dir / "grads-world1-rank0.pt")
    _one_step(tmp_path, rnn, devices=2, strategy="ddp_spawn")
    ranks = [torch.load(tmp_path / f"grads-world2-rank{r}.pt") for r in range(2)]

    # the ranks trained on disjoint halves of the same global batch
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == sorted(single["indices"])
    assert len(ranks[0]["indices"]) == len(ranks[1]["indices"]) == GLOBAL_BATCH // 2
    for name in single["grads"]:
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], rtol=0, atol=0, msg=name)
        assert float(single["grads"][name].abs().max()) > 0, name
    _assert_close(ranks[0]["grads"], single["grads"])

    # the tolerance catches the bug it guards against: the gradient of rank 0's pairs alone (a lost rank)
    data = synthetic_data(batch_size=GLOBAL_BATCH)
    data.setup("fit")
    half = collate(data.pairs("train"), ranks[0]["indices"])
    model = _model(rnn).train()
    (model.summed_loss(half) / half.tgt_keep.sum()).backward()
    lost = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(AssertionError):
        _assert_close(lost, single["grads"])
