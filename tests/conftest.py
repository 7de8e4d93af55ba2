"""Shared pytest configuration: markers, and the device the core tests run on.

``REVRNN_TEST_DEVICE=cuda`` (used by ``make gpu-check``) makes every tensor that a test creates without naming
a device land on that device (``torch.device`` as a context manager sets the default device), so the
exactness and gradient tests run unchanged on a GPU. The default is the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

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
