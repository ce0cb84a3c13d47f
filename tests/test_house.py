"""The package's layout as a contract: no import cycles, an engine that imports nothing from the plugin layer (nor
PEFT), and a command line that only parses and prints."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "sparse_peft"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that ``name`` imports, at module level or inside functions."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            found.update(t for t in [target, *(f"{target}.{a.name}" for a in node.names)] if t in modules)
    return found - {name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40 and graph["sparse_peft.pipeline"], "the import graph was not read"
    assert _cycles(graph) == []


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engine_imports_nothing_from_the_plugin_layer():
    graph = _graph()
    engine = {name: deps for name, deps in graph.items() if name.startswith("sparse_peft.sparse")}
    assert engine
    for name, deps in engine.items():
        outside = sorted(d for d in deps if not d.startswith("sparse_peft.sparse"))
        assert not outside, f"{name} imports {outside}"
        source = _modules()[name].read_text()
        assert "import peft" not in source and "from peft" not in source, f"{name} imports PEFT"


def test_cli_only_parses_and_prints():
    assert len((PACKAGE / "cli.py").read_text().splitlines()) <= 300
    assert "SFTTrainer" not in (PACKAGE / "cli.py").read_text()  # training lives in sparse_peft.pipeline


def test_every_data_file_of_the_package_ships_in_the_wheel():
    """Files the code reads at run time (the kernel's C source, the tested constraints) must be package data, or an
    installed copy would miss them (the kernel would silently fall back to the slower path)."""
    import pytest

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["package-data"]["sparse_peft"])
    data = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc", ".so") and "__pycache__" not in path.parts
    }
    assert data == listed, f"package-data lists {sorted(listed)}, the package holds {sorted(data)}"
