"""The README's code blocks run as written: a newcomer's first copy-paste must work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(containing: str) -> str:
    """The README's ```python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matches = [b for b in blocks if containing in b]
    assert len(matches) == 1, f"expected one README python block with {containing!r}, found {len(matches)}"
    return matches[0]


def test_user_lightning_module_with_revlstm_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's own truncated-BPTT LightningModule (nn.LSTM swapped for RevLSTM) fits with MemoryReport."""
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(python_block("class MyLM"), "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.finished and trainer.global_step == 20  # type: ignore[attr-defined]
    model = scope["model"]
    assert model.state[0].dtype == model.out.weight.dtype  # type: ignore[attr-defined]  # h_n feeds float32 layers


def test_api_block_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The API section's example (sizes shrunk so it runs in a second)."""
    monkeypatch.chdir(tmp_path)
    code = python_block("rnn = RevGRU(").replace("650", "64").replace("1150", "96").replace("70, 20", "20, 4")
    exec(compile(code, "README.md", "exec"), {})


# ----------------------------------------------------------------------------------- the docs stay true
ROOT = README.parent
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
#: Top-level folders whose paths the docs cite; a backticked path under one of them must exist.
TREE = ("lightning_revrnn/", "tests/", "benchmarks/", "configs/", "callbacks/", "datamodules/", "docs/", ".ci/")


def test_readme_starts_with_the_two_commands() -> None:
    """A fresh machine's first two commands come first: `make demo` (the main job) and `make test`."""
    first = re.match(r"# [^\n]+\n+```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None, "the README must open with its title and a bash block"
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_is_short() -> None:
    """The README is an entry point; the manual, the design and the figures live in docs/."""
    assert len(README.read_text().splitlines()) <= 200


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(doc: Path) -> None:
    """Every relative link of the README and docs/ names an existing file, and an existing heading."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and (path.suffix != ".md" or anchor not in anchors(path))):
            broken.append(target)
    assert not broken, f"{doc.name}: broken links {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_cited_paths_exist(doc: Path) -> None:
    """Every backticked repository path (``lightning_revrnn/core/sweep.py``, ``tests/core/...``) exists."""
    missing = []
    for path in re.findall(r"`([\w./-]+)`", doc.read_text()):
        if path.startswith(TREE) and "*" not in path and not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{doc.name}: no such paths {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imported_names_exist(doc: Path) -> None:
    """Every ``from lightning_revrnn... import X`` in a python block names something that exists."""
    import importlib

    missing = []
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
        for module, names in re.findall(r"^from (lightning_revrnn[\w.]*) import ([\w, ]+)$", block, flags=re.M):
            mod = importlib.import_module(module)
            missing += [f"{module}.{n}" for n in (n.strip() for n in names.split(",")) if not hasattr(mod, n)]
    assert not missing, f"{doc.name}: no such names {missing}"
