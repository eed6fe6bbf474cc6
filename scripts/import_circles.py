"""Import circles among fastbert's modules: strongly connected groups of the graph of module-level imports.

`from pkg import name` is an edge to the submodule pkg.name where there is one, else to pkg. Imports inside
functions are not edges (the registry imports implementations lazily by design).

    python scripts/import_circles.py        # prints the circles, exits 1 if there is one
"""
from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path


def module_files(root: Path) -> dict[str, Path]:
    files = {}
    for path in root.rglob("*.py"):
        if "__pycache__" not in path.parts:
            name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    graph = collections.defaultdict(set)
    for name, path in files.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def circles(root: Path) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    files = module_files(root)
    graph = import_graph(files)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in files:
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    found = circles(Path(__file__).resolve().parents[1] / "fastbert")
    print("import circles:", found or "none")
    sys.exit(1 if found else 0)
