"""A few DDP (``strategy="ddp"``) training steps of a reversible LM on 2 CPU processes (gloo).

Run by ``tests/lm/test_lm_ddp.py`` as a subprocess: Lightning's ``ddp`` strategy relaunches this script for
rank 1, which must not happen inside pytest. Exits non-zero on any failure; on success rank 0 prints a
line starting with :data:`MARKER`. With an output folder, every rank saves its gradients of the first
optimizer step there (``grads-world2-rank{r}.pt``, see :class:`GradSaver`) for comparison with a single
process. The model has no dropout, so those gradients do not depend on the rank-seeded masks.

    python tests/ddp_script.py [OUTPUT_FOLDER]

Also imported by the tests for the shared model, data and :class:`GradSaver`.
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import partial
from typing import Any, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel
from lightning_revrnn.lm.model import RnnType

MARKER = "DDP_SCRIPT_OK"
#: What Lightning's DDP launchers write into ``os.environ``: a test starts without them and restores them after, and
#: a child process must not inherit a test's leftovers.
DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GLOBAL_RANK",
    "RANK",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)
GLOBAL_BATCH = 4
WORLD = 2
STEPS = 3


def build_model(rnn: str = "revgru") -> LanguageModel:
    """The tiny LM of the DDP tests, seeded, without dropout (masks are drawn per (seed, step, rank), so
    with dropout a rank's masks differ from a single process's by design)."""
    torch.manual_seed(0)
    return LanguageModel(
        16,
        rnn=cast(RnnType, rnn),  # a test's parameter (a string); the model validates it
        num_layers=2,
        emb_size=16,
        hidden_size=24,
        dropout_emb=0.0,
        dropout_input=0.0,
        dropout_hidden=0.0,
        dropout_output=0.0,
        dropconnect=0.0,
        optimizer=partial(torch.optim.SGD, lr=0.5),
    )


def build_data() -> SyntheticLMDataModule:
    """Synthetic corpus, global batch :data:`GLOBAL_BATCH` (split over the ranks)."""
    return SyntheticLMDataModule(
        vocab_size=16,
        train_tokens=2000,
        val_tokens=400,
        test_tokens=400,
        batch_size=GLOBAL_BATCH,
        eval_batch_size=GLOBAL_BATCH,
        bptt=10,
    )


class GradSaver(Callback):
    """Saves each rank's (DDP-reduced) gradients and training inputs of the first optimizer step to
    ``folder/grads-world{W}-rank{r}.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.inputs: torch.Tensor | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.inputs = batch["inputs"].clone()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step != 0:
            return
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        path = os.path.join(self.folder, f"grads-world{trainer.world_size}-rank{trainer.global_rank}.pt")
        torch.save({"grads": grads, "inputs": self.inputs}, path)


class Checks(Callback):
    """Per-rank checks: sharded batches, different data per rank, parameters in sync after training."""

    def __init__(self) -> None:
        self.first_inputs: torch.Tensor | None = None
        self.local_batches: list[int] = []
        self.in_sync = False
        self.distinct_data = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.local_batches.append(int(batch["inputs"].shape[1]))
        if self.first_inputs is None:
            self.first_inputs = batch["inputs"].clone()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)  # (world, n)
        assert isinstance(gathered, torch.Tensor)
        assert gathered.shape[0] == trainer.world_size == WORLD, gathered.shape
        self.in_sync = all(torch.equal(gathered[0], g) for g in gathered[1:])
        assert self.first_inputs is not None
        inputs = pl_module.all_gather(self.first_inputs)
        self.distinct_data = not torch.equal(inputs[0], inputs[1])


def main(folder: str | None = None) -> None:
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
    warnings.filterwarnings("ignore", ".*all_gather is deprecated.*")
    torch.set_num_threads(1)
    model, data, checks = build_model(), build_data(), Checks()
    callbacks: list[Callback] = [checks] if folder is None else [checks, GradSaver(folder)]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_steps=STEPS,
        limit_val_batches=2,
        val_check_interval=STEPS,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.25,
        callbacks=callbacks,
    )
    trainer.fit(model, data)
    assert trainer.world_size == WORLD, trainer.world_size
    assert trainer.global_step == STEPS, trainer.global_step
    assert checks.local_batches == [GLOBAL_BATCH // WORLD] * STEPS, checks.local_batches
    assert checks.in_sync, "parameters differ across ranks after DDP training"
    assert checks.distinct_data, "both ranks trained on the same streams"
    loss = float(trainer.callback_metrics["train_loss"])
    val_ppl = float(trainer.callback_metrics["val_ppl"])
    assert torch.isfinite(torch.tensor([loss, val_ppl])).all(), (loss, val_ppl)
    if trainer.is_global_zero:
        print(
            f"{MARKER} world_size={trainer.world_size} global_step={trainer.global_step} "
            f"train_loss={loss:.4f} val_ppl={val_ppl:.3f}",
            flush=True,
        )
    end_process_group()


class EndProcessGroup(Callback):
    """For ``ddp_spawn``: end the process group in each spawned rank's teardown, before the worker exits
    (see :func:`end_process_group`); Lightning's spawn workers leave it alive."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        end_process_group()


def end_process_group() -> None:
    """Destroy the process group before the interpreter exits. Lightning leaves it alive; gloo's threads torn
    down at exit then aborted both ranks ("terminate called without an active exception", exit -6) in one
    of several runs here, after everything had succeeded."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
