"""``strategy="ddp"`` fit and test of a reversible LM with :class:`MemoryReport` and a CSV logger (2 CPU ranks).

Run by ``tests/callbacks/test_memory_report_ddp.py`` as a subprocess (Lightning's ``ddp`` relaunches this
script for rank 1, which must not happen inside pytest). Every rank prints ``MARKER rank=<r> ...`` after
``trainer.test`` returns; the process exits 0 only if both fit and test finished on this rank.

    python tests/callbacks/ddp_report_script.py OUTPUT_FOLDER STRATEGY
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import ParallelStrategy

from lightning_revrnn.callbacks import MemoryReport
from lightning_revrnn.datamodules import SyntheticLMDataModule
from lightning_revrnn.lm import LanguageModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: ddp_script
# (mypy finds ddp_script only when tests/ddp_script.py is in the same run, as in `make lint-mypy-lenient`)
from ddp_script import (  # type: ignore[import-not-found, unused-ignore]  # see the line above
    EndProcessGroup,
    end_process_group,
)

MARKER = "DDP_REPORT_OK"
WORLD = 2
STEPS = 2
GLOBAL_BATCH = 4
BPTT = 10
EMB = 16


def build_model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(16, rnn="revgru", num_layers=1, emb_size=EMB, optimizer=partial(torch.optim.SGD, lr=0.5))


def build_data() -> SyntheticLMDataModule:
    return SyntheticLMDataModule(
        vocab_size=16,
        train_tokens=2000,
        val_tokens=400,
        test_tokens=400,
        batch_size=GLOBAL_BATCH,
        eval_batch_size=GLOBAL_BATCH,
        bptt=BPTT,
    )


def run(folder: str, strategy: str) -> tuple[pl.Trainer, MemoryReport]:
    """Fit then test on 2 CPU processes; returns the trainer and the report."""
    report = MemoryReport(every_n_steps=1)
    callbacks: list[pl.Callback] = [report, EndProcessGroup()] if strategy == "ddp_spawn" else [report]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=STEPS,
        limit_val_batches=1,
        limit_test_batches=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(folder, name="ddp"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=folder,
    )
    model, data = build_model(), build_data()
    trainer.fit(model, data)
    if strategy == "ddp_spawn":
        fresh_port(trainer)
    trainer.test(model, data)
    return trainer, report


def fresh_port(trainer: pl.Trainer | None = None) -> None:
    """Let the next ``ddp_spawn`` launch pick a new free port instead of reusing the last launch's, so a
    second launch (``fit`` then ``test``) never meets the first one's sockets. The rank aborts seen here at
    exit came from gloo's teardown (see ``EndProcessGroup``); this removes the other shared resource.
    Lightning caches the port in the environment variable and in the trainer's cluster environment.
    """
    os.environ.pop("MASTER_PORT", None)
    if trainer is not None:
        strategy = trainer.strategy
        assert isinstance(strategy, ParallelStrategy) and strategy.cluster_environment is not None  # ddp_spawn
        # LightningEnvironment caches the port in a private attribute that ClusterEnvironment does not declare
        strategy.cluster_environment._main_port = -1  # type: ignore[attr-defined]  # LightningEnvironment's cache


def main(folder: str, strategy: str = "ddp") -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    trainer, report = run(folder, strategy)
    assert trainer.world_size == WORLD and trainer.global_step == STEPS
    print(f"{MARKER} rank={trainer.global_rank} history={len(report.history)} log_dir={trainer.log_dir}", flush=True)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
