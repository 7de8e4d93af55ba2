"""The ``Example::`` sections of the public docstrings run as written (doctest), module by module."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_revrnn


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(lightning_revrnn.__path__, "lightning_revrnn.")]
    for package in ("lightning_revrnn.callbacks", "lightning_revrnn.datamodules"):  # installed from the root folders
        names += [package] + [
            m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__, f"{package}.")
        ]
    return sorted(set(names) - {"lightning_revrnn.demo", "lightning_revrnn.cli"})


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
