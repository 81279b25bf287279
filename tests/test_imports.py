"""The package's import graph: no cycles, so each module imports only from modules below it.

Edges are read from the source (every ``from .x import`` / ``from wanlite.x import``, at any
depth, including imports inside functions), not from one run's ``sys.modules``: a lazy import
that closes a cycle is still a cycle for a reader."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "wanlite"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _edges(path: Path, name: str, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            if node.module is None:
                target = ""
        elif isinstance(node, ast.Import):
            target, names = "", [a.name for a in node.names]
        else:
            continue
        # ``from . import x`` imports the submodule x; the package itself is always imported
        # before any of its submodules, so an edge to it says nothing about the order.
        for t in names if not target else [target, *names]:
            if t in modules and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: _edges(p, name, set(files)) for name, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 20 and "wanlite.pipeline" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in import_graph() if not n.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)"
    subprocess.run([sys.executable, "-c", code, *names], check=True, timeout=300)


# The rooms, bottom to top (docs/layout.md): a module imports only from its own floor or below.
FLOORS = (
    ("wanlite.params", "wanlite.paths", "wanlite.options", "wanlite.video", "wanlite.preview"),
    ("wanlite.kernels",),
    ("wanlite.ops",),
    ("wanlite.models",),
    ("wanlite.weights",),
    ("wanlite.sampling",),
    ("wanlite.runtime",),
    ("wanlite.causal", "wanlite.frames"),
    ("wanlite.pipeline",),
    ("wanlite.convert", "wanlite.bench", "wanlite.server"),
    ("wanlite.cli", "wanlite.__main__"),
)


def floor(module: str) -> int | None:
    for i, names in enumerate(FLOORS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def test_every_module_has_a_floor_and_imports_point_down():
    graph = import_graph()
    upward = []
    for name, deps in graph.items():
        if name == "wanlite":  # the package's __init__ re-exports from above (lazily)
            continue
        assert floor(name) is not None, f"{name} is in no room of FLOORS"
        for dep in deps:
            if dep != "wanlite" and floor(dep) > floor(name):
                upward.append(f"{name} -> {dep}")
    assert not upward, "imports that point up: " + ", ".join(sorted(upward))
