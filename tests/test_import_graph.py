"""The module import graph of moetrain/, cluster/ and placement/ has no cycle.

Only module-level imports count (what runs when a module is imported; imports inside functions
and under ``if TYPE_CHECKING:`` are deferred). A cycle makes import order matter: a module
imported first from the other end of the cycle sees a half-initialised module (the
tokenizer -> shards -> packing -> tokenizer cycle of the data package was one)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moetrain", "cluster", "placement")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported (also inside module-level
    try / if / with blocks), not those in functions, classes or ``if TYPE_CHECKING:``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, ast.With):
            todo += node.body


def _all_imports(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """module -> the modules of these packages it imports at module level (``deferred``: also
    inside functions and ``if TYPE_CHECKING:``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in (_all_imports(tree) if deferred else _top_level_imports(tree)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from its package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                # a name that is a submodule is an edge to it; any other name, to ``base`` itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"]]  # d only leads into it; a self-import is not a cycle here
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_module_level_imports_only(tmp_path):
    graph = import_graph()
    assert "moetrain.storage.store" in graph["moetrain.storage"]  # a package's own submodule
    assert "moetrain.data.store" in graph["moetrain.data.tokenizer"]  # the data store, imported at the top
    assert "moetrain.hf.export" not in graph["moetrain.hf.load"]  # imported inside a function only


def test_no_import_cycle_in_the_packages():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_cycle_through_deferred_imports_either():
    """An import moved into a function hides a cycle from the import machinery, not from the
    design (the data package's tokenizer -> shards -> packing -> tokenizer was one; placement's
    solve <-> pairwise another, until LayerContext got its own module; solve <-> select a third,
    until select ran its candidates through methods.py instead of solve.py)."""
    found = cycles(import_graph(deferred=True))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", ["moetrain.data.tokenizer", "moetrain.data.shards", "moetrain.data.packing",
                                    "moetrain.storage", "moetrain.checkpoint", "moetrain.hf.safetensors_io"])
def test_each_data_and_store_module_imports_first_in_a_fresh_interpreter(module):
    """Imported first (nothing else loaded), each of these modules initialises: no cycle."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert importlib.util.find_spec(module) is not None
