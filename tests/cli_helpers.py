"""Running the ``revrnn`` command in a subprocess from tests, and reading what it wrote."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from ddp_script import DIST_ENV
from pytorch_lightning.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
#: Quiet, small and on one CPU thread: the same arithmetic in every run of a test.
QUIET = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
]


def revrnn(*args: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``revrnn <args>`` in ``cwd`` (one thread); fails the test on a timeout, and with ``check`` on a non-zero
    exit, showing the end of the output."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    tests = str(Path(__file__).resolve().parent)  # configs may name callbacks of this module (ExitAt)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([tests, *filter(None, [env.get("PYTHONPATH")])]),
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lightning_revrnn.cli", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"revrnn {' '.join(args[:1])} ran past {timeout} s") from error
    if check:
        output = (proc.stdout + proc.stderr)[-4000:]
        assert proc.returncode == 0, f"revrnn {args[0]} exited {proc.returncode}:\n{output}"
    return proc


def metrics(log_dir: Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger's ``metrics.csv``."""
    with (log_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def last_value(log_dir: Path, key: str) -> float:
    """The last logged value of ``key`` in a CSVLogger folder."""
    values = [float(r[key]) for r in metrics(log_dir) if r.get(key)]
    assert values, f"{key} not logged in {log_dir}"
    return values[-1]


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights stored in a Lightning checkpoint."""
    return dict(torch.load(path, weights_only=False, map_location="cpu")["state_dict"])


#: :class:`ExitAt`'s exit status.
EXIT_CODE = 75


class ExitAt(Callback):
    """Ends the process at once, as a kill would (no exception, no hook, no checkpoint), before optimizer step
    ``at + 1`` starts."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_CODE)
