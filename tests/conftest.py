"""Shared pytest configuration: markers."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ddp: multi-process DistributedDataParallel tests on CPU (deselect with -m 'not ddp')"
    )
