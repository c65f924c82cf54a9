"""The package's import graph: no cycles, function-level imports included (a cycle hidden
in a function works until someone moves the import, then fails at import time)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "anomfast"
pytestmark = pytest.mark.skipif(not (PKG / "__init__.py").is_file(), reason="needs the source tree")


COMPILED = {"_C", "_C_cuda"}  # the extension modules: leaves


def _name(path: Path) -> str:
    """A module's dotted name inside the package: 'metrics', 'cli.grid'; a package is its
    folder ('cli'), the top package '__init__'."""
    parts = path.relative_to(PKG).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def _package(mod: str, path: Path) -> list:
    """The package a module's relative imports start from, as name parts ([] the top)."""
    parts = [] if mod == "__init__" else mod.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def import_graph() -> dict:
    """{module: modules of the package it imports anywhere in its body}, function-level
    imports included, relative ones resolved by their level. Names as _name gives them.
    The import of a module's parent packages that Python adds is no edge: the package
    __init__s import nothing back at module level."""
    files = {_name(p): p for p in PKG.rglob("*.py")}
    mods = set(files)

    def known(parts) -> str:
        """The module parts name, or the package it is a name of (from pkg import name)."""
        name = ".".join(parts) or "__init__"
        return name if name in mods else ".".join(parts[:-1]) or "__init__"

    graph = {}
    for mod, p in files.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package(mod, p)
                    base = base[:len(base) - (node.level - 1)]
                elif (node.module or "").split(".")[0] == "anomfast":
                    base = []
                else:
                    continue
                parts = base + [x for x in (node.module or "").split(".") if x]
                if not node.level:
                    parts = parts[1:]  # 'anomfast' itself
                if node.module and not (node.level == 0 and node.module == "anomfast"):
                    deps.add(known(parts))
                else:  # from . import x, y: submodules, compiled leaves, or names of the package itself
                    deps.update(known(parts + [a.name]) for a in node.names if a.name not in COMPILED)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if parts[0] == "anomfast":
                        deps.add(known(parts[1:]))
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def _path(mod: str) -> str:
    p = PKG / Path(*mod.split("."))
    return str((p / "__init__.py" if p.is_dir() else p.with_suffix(".py")).relative_to(PKG.parent))


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


# the command-line application: anomfast/cli/ and `python -m anomfast`'s __main__ (which
# must stay at the top); everything else is the library, which must not import it
def is_cli(mod: str) -> bool:
    return mod == "cli" or mod.startswith("cli.") or mod == "__main__"


def library_imports_of_the_cli(graph: dict) -> list:
    return [f"{_path(mod)} imports the CLI's {sorted(_path(d) for d in deps if is_cli(d))}"
            for mod, deps in sorted(graph.items()) if not is_cli(mod) and any(is_cli(d) for d in deps)]


def test_the_library_does_not_import_the_cli():
    graph = import_graph()
    assert {"cli", "cli.app", "cli.grid", "cli.runner", "cli.report", "cli.plots", "cli.demo"} <= set(graph)
    assert {"metrics", "histogram", "accumulate", "__init__"} <= set(graph) and not any(is_cli(m) for m in (
        "metrics", "histogram", "accumulate", "__init__", "tables"))
    assert library_imports_of_the_cli(graph) == []


def test_the_graph_resolves_relative_imports_by_level():
    graph = import_graph()
    assert {"cli.grid", "accumulate", "methods"} <= graph["cli.runner"]   # from .grid, from ..accumulate
    assert "cli.app" in graph["cli"] and "cli" in graph["__main__"]       # from .app, from .cli
    assert "cli.demo" in graph["cli.grid"]                                # function level: from .demo
    assert "__init__" in graph["cli.app"]                                 # from .. import build_info
    assert library_imports_of_the_cli({"metrics": {"cli.report"}, "cli.report": {"metrics"}}) != []
