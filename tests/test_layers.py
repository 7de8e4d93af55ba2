"""The package's floors: every import runs down (or sideways within a floor), and no module imports itself
back through a cycle. Read from the source (``ast``), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Source folders and the package names they install as.
SOURCES = {
    "lightning_revrnn": ROOT / "lightning_revrnn",
    "lightning_revrnn.callbacks": ROOT / "callbacks",
    "lightning_revrnn.datamodules": ROOT / "datamodules",
}
#: What each floor may import from the package (besides itself). The core names the fused backend only by a
#: string, on first use (core.backend.backend_for), never by an import statement.
ALLOWED = {
    "core": set(),
    "fused": {"core"},
    "shared": {"core"},
    "chunked_loss": {"core"},
    "checkpoints": set(),
    "memory": set(),
    "datamodules": set(),
    "lm": {"core", "shared", "chunked_loss", "checkpoints"},
    "translation": {"core", "shared", "chunked_loss", "checkpoints", "datamodules"},
    "callbacks": {"core", "memory"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def floor(module: str) -> str | None:
    """The floor of ``lightning_revrnn.X...`` (None for the top-level __init__, cli and demo, which may import
    anything)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("cli", "demo"):
        return None
    return parts[1]


def imports(module: str, path: Path) -> set[str]:
    names = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names |= {f"{target}.{a.name}" for a in node.names}
    known = modules()
    return {n for n in names if n in known}


def test_every_import_runs_down_a_floor() -> None:
    wrong = []
    for module, path in modules().items():
        own = floor(module)
        if own is None:
            continue
        for target in imports(module, path):
            other = floor(target)
            if other is None:
                other = "top"
            if other != own and other not in ALLOWED[own]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    graph = {m: imports(m, p) - {m} for m, p in modules().items()}
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}  # parents
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, m, t]))
            if t not in state:
                visit(t, [*trail, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
