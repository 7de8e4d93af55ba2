"""MemoryReport under DistributedDataParallel on CPU (gloo, 2 processes): fit and test end on every rank,
the report is written once, by rank 0, with peaks reduced by max and bits by sum.

``ddp_spawn`` runs inside pytest; ``ddp`` relaunches its script per rank, so it runs as a subprocess
(``ddp_report_script.py``) in its own session, killed as a group on timeout. Deselect with ``-m "not ddp"``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist

if str(Path(__file__).parent) not in sys.path:  # the script is a sibling module (also run as a script)
    sys.path.insert(0, str(Path(__file__).parent))

from ddp_report_script import BPTT, EMB, GLOBAL_BATCH, MARKER, STEPS, WORLD, run

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SCRIPT = Path(__file__).with_name("ddp_report_script.py")


def _check_report(root: Path) -> None:
    """One report, in the logger's folder, with WORLD ranks' accounting summed and every step present."""
    reports = sorted(root.rglob("memory_report.json"))
    assert len(reports) == 1, reports
    assert (reports[0].parent / "memory_report.png").is_file()
    steps = json.loads(reports[0].read_text())["steps"]
    assert [row["step"] for row in steps] == [float(s) for s in range(1, STEPS + 1)]
    for row in steps:
        assert row["world_size"] == WORLD and row["memory/windows"] == WORLD
        # bits summed over ranks: each rank holds GLOBAL_BATCH / WORLD columns, together the global batch
        assert row["memory/normal_bits"] == 32 * BPTT * GLOBAL_BATCH * EMB
        assert row["memory/peak_bytes"] >= row["memory/peak_excl_grad_bytes"] > 0
    assert "memory/peak_bytes" in (reports[0].parent / "metrics.csv").read_text()
    # trainer.test ran to the end after fit (ddp_spawn's test may open a new logger version)
    assert any("test_ppl" in p.read_text() for p in root.rglob("metrics.csv"))


def test_ddp_spawn_fit_and_test_with_memory_report(tmp_path: Path, clean_env: None) -> None:
    trainer, _ = run(str(tmp_path), "ddp_spawn")
    assert trainer.state.finished
    _check_report(tmp_path)


def test_ddp_fit_and_test_with_memory_report_in_a_subprocess(
    tmp_path: Path, ddp_subprocess: Callable[..., str]
) -> None:
    out = ddp_subprocess(SCRIPT, str(tmp_path), "ddp", cwd=tmp_path)
    markers = sorted(line.split()[1] for line in out.splitlines() if line.startswith(MARKER))
    assert markers == [f"rank={r}" for r in range(WORLD)], out[-4000:]  # fit and test returned on every rank
    _check_report(tmp_path)


def test_ddp_spawn_report_goes_to_dirpath_known_in_the_main_process(tmp_path: Path, clean_env: None) -> None:
    """Without ``dirpath`` the main process cannot tell where a ``ddp_spawn`` fit put the report: its
    ``trainer.log_dir`` names the logger's next version. With it, every process agrees on the folder."""
    from ddp_report_script import build_data, build_model
    from ddp_script import EndProcessGroup  # type: ignore[import-not-found, unused-ignore]  # as in ddp_report_script.py
    from pytorch_lightning import Trainer
    from pytorch_lightning.loggers import CSVLogger

    from lightning_revrnn.callbacks import MemoryReport

    folder = tmp_path / "reports"
    report = MemoryReport(every_n_steps=1, plot=False, dirpath=folder)
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp_spawn",
        max_steps=STEPS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=CSVLogger(str(tmp_path), name="ddp"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report, EndProcessGroup()],
    )
    trainer.fit(build_model(), build_data())
    assert trainer.state.finished
    assert report.history == [] and report.report_dir is None  # the workers' copies measured and wrote
    steps = json.loads((Path(report.dirpath or "") / "memory_report.json").read_text())["steps"]
    assert [row["step"] for row in steps] == [float(s) for s in range(1, STEPS + 1)]
    assert sorted(tmp_path.rglob("memory_report.json")) == [folder / "memory_report.json"]
    fit_metrics = sorted(tmp_path.rglob("metrics.csv"))  # the fit logged as usual, into the workers' version
    assert len(fit_metrics) == 1 and fit_metrics[0].parent.name == "version_0"
