"""The package's static import graph has no cycles (issue 12: a sans-IO core under an IO layer).

Every ``import`` counts: module level, inside functions, and under ``if TYPE_CHECKING:`` (a
cycle hidden from the interpreter is still two modules that cannot be understood, or moved,
one without the other). ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module of the package, else to ``pkg``; an import of ``pkg.mod`` is not counted as an import
of ``pkg``'s ``__init__`` (the parent packages' ``__init__`` only re-export).
"""

from __future__ import annotations

import ast
from pathlib import Path

import migrator

ROOT = Path(migrator.__file__).resolve().parent
PACKAGE = "migrator"

# The sans-IO core: the session and the shim's modules it imports, directly or through one
# another. None of them may import a socket, the event loop, a Redis client or the shim's IO
# layer. (Modules outside ``migrator.shim`` it uses, the phase table and its state file, are not
# walked: they are the migration's, not the data path's.)
CORE = ("migrator.shim.session",)
IO_MODULES = frozenset({"asyncio", "socket", "ssl", "selectors", "uvloop", "redis", "migrator.shim.io",
                        "migrator.shim.server", "migrator.shim.workers", "migrator.shim.admin"})


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, modules: dict[str, Path], external: bool = False) -> set[str]:
    """The modules ``name`` imports anywhere in its source (package modules; plus others if ``external``)."""
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def add(mod: str) -> None:
        if mod in modules or external:
            found.add(mod)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                up = node.level - 1
                anchor = ".".join(parts[: len(parts) - up] if up else parts)
                mod = f"{anchor}.{node.module}" if node.module else anchor
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                if sub in modules:
                    add(sub)
                else:
                    add(mod)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (an iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                path.pop()
                colour[node] = BLACK
                continue
            if nxt not in colour:
                continue
            if colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_finder_sees_a_cycle():
    """The cycle finder reports a cycle through a function-level import, so a green run means something."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_counts_type_checking_and_function_imports():
    """Imports under TYPE_CHECKING and inside functions are edges of the graph, relative ones resolved."""
    graph = _graph()
    # dispatch.py imports compare and effects as ``from migrator.shim import compare``: module edges.
    assert {"migrator.shim.compare", "migrator.shim.effects"} <= graph["migrator.shim.dispatch"]
    # cli/shim.py imports the shim package inside a function.
    assert "migrator.shim" in graph["migrator.cli.shim"]
    # session.py imports host.py only under TYPE_CHECKING.
    assert "migrator.shim.host" in graph["migrator.shim.session"]


def test_relative_imports_are_resolved(tmp_path):
    """``from . import x``, ``from .x import y`` and ``from ..x import y`` name the modules they import."""
    mod = tmp_path / "m.py"
    mod.write_text("from . import sibling\nfrom .sibling import f\nfrom ..top import g\nfrom .. import other\n")
    modules = dict.fromkeys(["p", "p.q", "p.q.m", "p.q.sibling", "p.top", "p.other"], mod)
    assert _imports("p.q.m", mod, modules) == {"p.q.sibling", "p.top", "p.other"}


def test_no_import_cycles():
    """No module of the package imports itself through others, counting every kind of import."""
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_never_reaches_io():
    """The shim's core (the Session and all it imports) reaches no socket, event loop or IO-layer module."""
    modules = _modules()
    seen: set[str] = set()
    todo = list(CORE)
    reached_io: list[tuple[str, str]] = []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for dep in _imports(name, modules[name], modules, external=True):
            root = dep.split(".")[0]
            if dep in IO_MODULES or root in IO_MODULES:
                reached_io.append((name, dep))
            elif dep in modules and dep.startswith("migrator.shim."):
                todo.append(dep)
    assert not reached_io, "the core imports the IO layer: " + ", ".join(f"{a} -> {b}" for a, b in reached_io)
    assert "migrator.shim.resp" in seen and "migrator.shim.sequencer" in seen  # (the walk did walk)
