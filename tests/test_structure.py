"""The package's import graph: no cycles, function-level imports included (a cycle hidden
in a function works until someone moves the import, then fails at import time)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "anomfast"
pytestmark = pytest.mark.skipif(not (PKG / "__init__.py").is_file(), reason="needs the source tree")


COMPILED = {"_C", "_C_cuda"}  # the extension modules: leaves


def import_graph() -> dict:
    """{module: modules of the package it imports anywhere in its body} ('__init__' is the package)."""
    mods = {p.stem for p in PKG.glob("*.py")}
    graph = {}
    for p in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 or (node.module or "").split(".")[0] == "anomfast":
                    parts = (node.module or "").split(".")
                    sub = parts[0] if node.level == 1 else (parts[1] if len(parts) > 1 else "")
                    if sub:
                        deps.add(sub)
                    else:  # from . import x, y: submodules, compiled leaves, or names of the package itself
                        deps.update(a.name if a.name in mods else "__init__" for a in node.names
                                    if a.name not in COMPILED)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "anomfast":
                        deps.add(parts[1] if len(parts) > 1 else "__init__")
        graph[p.stem] = {d for d in deps if d in mods and d != p.stem}
    return graph


def find_cycle(graph: dict):
    state = {}

    def visit(n, path):
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                c = visit(d, path + [d])
                if c:
                    return c
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n, [n])
            if c:
                return c
    return None


def test_no_import_cycles():
    graph = import_graph()
    # the package's __init__ loads its names lazily (PEP 562, by name, not by import
    # statement); a module taking a name from the package itself would close a cycle
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# the command-line application; everything else is the library, which must not import it
CLI_MODULES = {"cli", "__main__", "grid", "runner", "report", "plots", "demo"}


def test_the_library_does_not_import_the_cli():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod in CLI_MODULES:
            continue
        assert not (deps & CLI_MODULES), f"anomfast/{mod}.py imports the CLI's {sorted(deps & CLI_MODULES)}"
