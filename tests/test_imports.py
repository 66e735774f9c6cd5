"""The package's own imports form no circle: every ``sdlora_dist.*`` import, at module level or inside a function.

A circle that a function-level import hides still couples the modules both ways and breaks as soon as someone moves
the import to the top, so both kinds count. The graph is read from the source (AST), nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each installed package lives in the checkout (pyproject.toml's package-dir).
PACKAGE_DIRS = {"sdlora_dist": "sdlora_dist", "sdlora_dist.cli": "cli", "sdlora_dist.export": "export"}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package and its cli/export subpackages."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules one import statement loads (``from X import Y``: module X.Y if there is one, else X)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & modules
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(max(node.level - 1, 0)):
        base = base.rpartition(".")[0]
    target = ".".join(p for p in (base if node.level else "", node.module or "") if p)
    found = set()
    for alias in node.names:
        name = f"{target}.{alias.name}"
        found.add(name if name in modules else target)
    return found & modules


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (inside functions too)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, path.name == "__init__.py", set(modules))
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None when the graph has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            found = visit(nxt) if nxt not in state else None
            if found:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        found = visit(start) if start not in state else None
        if found:
            return found
    return None


def test_graph_covers_every_module_and_sees_function_level_imports():
    graph = import_graph(ROOT)
    assert {"sdlora_dist.jobs.launch", "sdlora_dist.cli.main", "sdlora_dist.export.verify"} <= set(graph)
    # worker.py imports the recipe inside main(): a function-level edge must be in the graph
    assert "sdlora_dist.recipe" in graph["sdlora_dist.jobs.worker"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_package_imports_have_no_cycle():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
