"""No import cycles in the package: each module can be imported on its own, in any order.

The graph is built from the source with :mod:`ast` (nothing is imported): an edge for every
import of a ``clipinvert`` module executed when the module itself is imported — module level,
including ``if``/``try``/``with``/class bodies, but not function bodies (run later) nor
``if TYPE_CHECKING:`` blocks (never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import clipinvert

PACKAGE = Path(clipinvert.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _module_level(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _module_level([n for n in inner if isinstance(n, ast.stmt)])
        for handler in getattr(node, "handlers", []):
            yield from _module_level(handler.body)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    edges = set()
    for node in _module_level(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    edges.add(sub)
                elif target in known:
                    edges.add(target)
    edges.discard(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, …, a]``, or ``None`` when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_imports_it_should() -> None:
    graph = import_graph()
    assert "clipinvert.weights.reader" in graph["clipinvert.checkpoints"]
    assert "clipinvert.weights.download" in graph["clipinvert.registry"]
    assert "clipinvert.registry" not in graph["clipinvert.weights.download"]  # type-only
    assert "clipinvert.errors" in graph["clipinvert.weights.safety"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_finding_and_downloading_weights_loads_no_torch() -> None:
    """The registry and the downloader share :mod:`clipinvert.locations` instead of importing
    each other through the torch-heavy loaders: ``models list/path/download`` stay light."""
    code = ("import sys, clipinvert.registry, clipinvert.weights.download; "
            "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
