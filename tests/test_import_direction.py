"""Imports between our packages flow one way: config <- queueing <- {api, workers}; gpu_monitor <- config.

Every module of a package is parsed (not imported), and every import in it counts: at the top
level, inside functions and under ``TYPE_CHECKING``. The installed packages never import the
benchmark scripts (``benchmarks/``, not installed) nor ``tests``; ``loadtest`` (``inferq loadtest``)
imports only ``config``. ``benchmarks`` and ``tests`` may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = frozenset(
    {"api", "workers", "queueing", "config", "gpu_monitor", "inferq", "loadtest", "benchmarks", "tests"}
)
#: The packages of ours each checked package may import, besides itself.
ALLOWED = {
    "config": frozenset(),
    "queueing": frozenset({"config"}),
    "api": frozenset({"config", "queueing"}),
    "workers": frozenset({"config", "queueing"}),
    "gpu_monitor": frozenset({"config"}),
    "loadtest": frozenset({"config"}),
    "inferq": frozenset({"api", "workers", "queueing", "config", "gpu_monitor", "loadtest"}),
}


def imported_packages(source: str, module: tuple[str, ...]) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in ``source``, the module named by ``module``.

    ``module`` is the file's path parts without ``.py`` (``("api", "routes", "chat")``), so
    that relative imports resolve to the package they name.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update((alias.name.partition(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports never leave the top-level package
                found.add((module[0], node.lineno))
            elif node.module:
                found.add((node.module.partition(".")[0], node.lineno))
    return found


def violations(package: str) -> list[str]:
    """``path:line imports pkg`` for every import of ours that ``package`` may not make."""
    allowed = ALLOWED[package] | {package}
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = path.relative_to(ROOT).with_suffix("").parts
        for name, line in sorted(imported_packages(path.read_text(), module)):
            if name in OURS and name not in allowed:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    allowed = ", ".join(sorted(ALLOWED[package])) or "none of ours"
    found = violations(package)
    assert not found, f"{package} may import only {allowed}:\n" + "\n".join(found)


def test_every_kind_of_import_is_counted() -> None:
    source = (
        "import os, workers.tasks\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from api.protocol import X\n"
        "def f():\n"
        "    from . import sibling\n"
        "    import gpu_monitor\n"
    )
    names = {name for name, _ in imported_packages(source, ("queueing", "sub", "probe"))}
    assert names == {"os", "workers", "typing", "api", "queueing", "gpu_monitor"}


def module_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (any kind of import, ``TYPE_CHECKING`` too)."""
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                            for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in paths and d not in (name, package)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected parts of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            part = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_cycles_inside_a_package(package: str) -> None:
    """The package's own package module (``api``, the app factory) is left out: it imports everything."""
    assert cycles(module_graph(package)) == []


def test_a_cycle_under_type_checking_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
