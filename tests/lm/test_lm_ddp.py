"""DistributedDataParallel on CPU (gloo, 2 processes) with a reversible language model.

``ddp_spawn`` runs inside pytest; ``ddp`` relaunches its script per rank, so it runs as a subprocess
(``tests/ddp_script.py``) in its own session, killed as a group on timeout. Deselect with ``-m "not ddp"``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist

if str(Path(__file__).parent) not in sys.path:  # ddp_script is a sibling module (also run as a script)
    sys.path.insert(0, str(Path(__file__).parent))

from ddp_script import GLOBAL_BATCH, MARKER, EndProcessGroup, GradSaver, build_data, build_model

pytestmark = [
    pytest.mark.ddp,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__` defined.*"),
    pytest.mark.filterwarnings("ignore:.*ReduceLROnPlateau conditioned on metric val_ppl which is not available.*"),
    pytest.mark.filterwarnings("ignore:.*self.log\\(\\).*trainer. reference is not registered.*"),
]

SCRIPT = Path(__file__).resolve().parent.parent / "ddp_script.py"  # shared with the other DDP tests


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
    trainer.fit(build_model(rnn), build_data())
    if kwargs.get("strategy") != "ddp_spawn":  # spawn does not bring global_step back to the main process
        assert trainer.global_step == 1


def _single_process_grads(tmp_path: Path, rnn: str) -> dict[str, Any]:
    folder = tmp_path / "single"
    folder.mkdir()
    _one_step(folder, rnn, devices=1)
    return torch.load(folder / "grads-world1-rank0.pt")


#: DDP vs one process on the global batch, per gradient tensor: ``max|g_ddp - g_one| ≤ GRAD_TOL·max|g_one|``.
#: The buffer decides drains per example, so no example's trajectory depends on its batchmates and the
#: two runs differ only by float arithmetic:
#:  * gloo averages the ranks' per-rank means, ``(g0 + g1)/2``, where one process sums the four examples'
#:    terms in another order: a few float32 ulps (~2^-22 relative), negligible here;
#:  * every GEMM runs over 2 batch rows on a rank and 4 in one process, and a BLAS may round a different
#:    row count differently in the last bit. A one-ulp difference in a pre-activation can move the rounding
#:    of an update to 2^-23 by one unit; the next multiplication then pushes different low bits into the
#:    buffer and injects a different ``B mod z*`` into h (anything below z* ≤ 2^10 units, i.e. < 2^-13),
#:    and rarely the rounding of z to 2^-10 flips. So states differ by a few multiplications' worth of
#:    2^-13 (measured over these 10 steps: up to 1003 units ≈ 1.2e-4), and the gradients, smooth functions
#:    of the states and gates, by the same relative order (measured: ≤ 1.2e-4·max|g|, in embedding.weight;
#:    the nn.GRU baseline: float round-off only).
#: GRAD_TOL = 2^-8 = 32 × 2^-13 leaves room for several such differences and ~30× margin on the measured
#: one, yet catches real bugs by orders: a factor 2 is off by 0.5·max|g|, a lost rank by ≥ 0.5·max|g|
#: (checked in :func:`_assert_tolerance_rejects_a_lost_rank` from rank 0's examples alone).
GRAD_TOL = 2.0**-8


def _assert_grads_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name in sorted(want):
        scale = float(want[name].abs().max())
        error = float((got[name] - want[name]).abs().max())
        assert error <= GRAD_TOL * scale, f"{name}: max difference {error:.3g} > {GRAD_TOL:.3g} × max|g| {scale:.3g}"


def _assert_tolerance_rejects_a_lost_rank(single: dict[str, Any], rnn: str) -> None:
    """The gradient of rank 0's examples alone (what a run losing rank 1's contribution would apply)
    must fail the comparison for every parameter: the tolerance is tight enough to catch that bug."""
    data = build_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch["inputs"], single["inputs"])
    model = build_model(rnn).train()
    model.training_step({**batch, "inputs": batch["inputs"][:, :2], "targets": batch["targets"][:, :2]}, 0).backward()
    for name, p in model.named_parameters():
        with pytest.raises(AssertionError):
            _assert_grads_close({name: p.grad}, {name: single["grads"][name]})


def _assert_ddp_grads_equal_single(folder: Path, single: dict[str, Any], rnn: str) -> None:
    """Rank r trained on columns [2r, 2r+2) of the global batch; both ranks hold the all-reduced gradient,
    which equals the single-process gradient of the whole global batch within :data:`GRAD_TOL`."""
    ranks = [torch.load(folder / f"grads-world2-rank{r}.pt") for r in range(2)]
    assert single["inputs"].shape[1] == GLOBAL_BATCH
    for r, saved in enumerate(ranks):
        assert torch.equal(saved["inputs"], single["inputs"][:, 2 * r : 2 * r + 2])
    names = set(single["grads"])
    assert names and all(set(saved["grads"]) == names for saved in ranks)
    for name in sorted(names):
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], rtol=0, atol=0, msg=name)
    _assert_grads_close(ranks[0]["grads"], single["grads"])
    assert all(single["grads"][n].abs().max() > 0 for n in names)
    _assert_tolerance_rejects_a_lost_rank(single, rnn)


@pytest.mark.parametrize("rnn", ["revgru", "gru"])
def test_ddp_spawn_gradients_equal_single_process(tmp_path: Path, clean_env: None, rnn: str) -> None:
    single = _single_process_grads(tmp_path, rnn)
    _one_step(tmp_path, rnn, devices=2, strategy="ddp_spawn")
    _assert_ddp_grads_equal_single(tmp_path, single, rnn)


def test_ddp_strategy_in_a_subprocess(tmp_path: Path, ddp_subprocess: Callable[..., str]) -> None:
    """A few ``strategy="ddp"`` steps of a reversible LM (the script itself checks sharding, parameter sync
    and finite metrics); its first-step gradients equal a single process's on the global batch."""
    out = ddp_subprocess(SCRIPT, str(tmp_path), cwd=tmp_path)
    marker = [line for line in out.splitlines() if line.startswith(MARKER)]
    assert len(marker) == 1, out[-4000:]
    assert "world_size=2" in marker[0] and "global_step=3" in marker[0]
    _assert_ddp_grads_equal_single(tmp_path, _single_process_grads(tmp_path, "revgru"), "revgru")
