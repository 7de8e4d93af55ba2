"""Every shipped config names classes that exist: each ``class_path`` imports."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def class_paths(node: Any) -> list[str]:
    """Every ``class_path`` value in a parsed YAML tree."""
    if isinstance(node, dict):
        own = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return own + [p for value in node.values() for p in class_paths(value)]
    if isinstance(node, list):
        return [p for item in node for p in class_paths(item)]
    return []


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_class_path_resolves(config: Path) -> None:
    paths = class_paths(yaml.safe_load(config.read_text()))
    assert paths, f"{config.name} names no class"
    for path in paths:
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{config.name}: {path} does not resolve"
