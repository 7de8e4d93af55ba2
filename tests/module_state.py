"""Snapshots of a module's attributes, to check that a call leaves no state behind on it (e.g. a head's
``bind``: the window's tensors live on the bound object only)."""

from __future__ import annotations

from typing import Any

from torch import nn


def module_state(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Every attribute of ``module`` and of its submodules, the registries (parameters, buffers, submodules,
    hooks) copied one level deep, so an attribute added, replaced or registered later shows up."""
    return {
        name: {k: dict(v) if isinstance(v, dict) else v for k, v in vars(m).items()}
        for name, m in module.named_modules(remove_duplicate=False)
    }


def assert_same_state(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    """The two snapshots hold the same attributes with the same values (registries: the same objects)."""
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        for key, value in before[name].items():
            now = after[name][key]
            if isinstance(value, dict):
                assert value.keys() == now.keys() and all(value[k] is now[k] for k in value), (name, key)
            else:
                assert value is now or value == now, (name, key)
