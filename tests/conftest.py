"""Shared pytest configuration: markers, and the device the core tests run on.

``REVRNN_TEST_DEVICE=cuda`` (used by ``make gpu-check``) makes every tensor that a test creates without naming
a device land on that device (``torch.device`` as a context manager sets the default device), so the
exactness and gradient tests run unchanged on a GPU. The default is the CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

# CI (``.ci/run`` sets HYPOTHESIS_PROFILE=ci) draws the same examples on every run, so a red CI is reproducible;
# a developer's run keeps hypothesis's random search.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Test helpers are imported by module name from any test folder: the shared ones at tests/ (ddp_script,
# seq2seq_helpers) and the core's (test_masks, test_cells), which the fused backend's tests reuse.
for _folder in (Path(__file__).parent, Path(__file__).parent / "core"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from ddp_script import DIST_ENV  # noqa: E402  # after the sys.path entries above

#: The device tests create their tensors on (``REVRNN_TEST_DEVICE``; default ``cpu``).
TEST_DEVICE = os.environ.get("REVRNN_TEST_DEVICE", "cpu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ddp: multi-process DistributedDataParallel tests on CPU (deselect with -m 'not ddp')"
    )
    if TEST_DEVICE != "cpu" and not torch.cuda.is_available():
        raise pytest.UsageError(f"REVRNN_TEST_DEVICE={TEST_DEVICE} but CUDA is not available on this machine.")


@pytest.fixture(autouse=True)
def _test_device() -> Iterator[None]:
    """Create the test's tensors on ``REVRNN_TEST_DEVICE`` (nothing changes on the CPU default)."""
    if TEST_DEVICE == "cpu":
        yield
        return
    with torch.device(TEST_DEVICE):
        yield


@pytest.fixture
def clean_env() -> Iterator[None]:
    """Lightning's launchers write MASTER_PORT & co. into os.environ: start without them, restore afterwards."""
    saved = dict(os.environ)
    for key in DIST_ENV:
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid`` (Linux /proc)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def run_ddp_script(script: Path, *args: str, cwd: Path, timeout: float = 300) -> str:
    """Run a ``strategy="ddp"`` script as a subprocess in its own session (Lightning relaunches it per rank,
    which inside pytest would relaunch pytest). Fails the test on a timeout (a rank hung), a non-zero exit,
    or a process of the session that outlives the script; returns the combined output."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    leftovers: list[int] = []
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{script.name} timed out (a rank hung); output:\n{out[-4000:]}")
    finally:
        if Path("/proc").is_dir():  # rank 1 is rank 0's child in the same session: wait until it is gone
            deadline = time.monotonic() + 20
            while (leftovers := _group_alive(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.2)
        if leftovers or proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert not leftovers, f"processes outlived {script.name}: {leftovers}"
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture
def ddp_subprocess(clean_env: None) -> Callable[..., str]:
    """:func:`run_ddp_script`, with the launchers' variables cleared for the test."""
    return run_ddp_script


@pytest.fixture(scope="session")
def trained_translation(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A small RevGRU TranslationModel trained on the synthetic task, its DataModule and its checkpoint saved from
    Python (:func:`seq2seq_helpers.trained_synthetic`), trained once for the translate_text and CLI tests."""
    from seq2seq_helpers import trained_synthetic

    return trained_synthetic(tmp_path_factory.mktemp("trained_translation"))
