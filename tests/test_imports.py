"""The import graph of the three packages: layered, no cycles, the CLI at the top, no private names shared.

Every import statement counts, at module level, inside functions and under TYPE_CHECKING alike: a
cycle held apart by a late import is still two modules that each need the other. Importing
`a.b.c` also runs the packages `a.b` and `a` (their `__init__`), so those are edges too, except the
importer's own packages, which are already running when it is imported (unless it imports one of
them outright: `from pipelines import X` inside pipelines needs pipelines' `__init__` done).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shard_tools", "pipelines", "mt_scale")
CLI = "mt_scale.cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def resolve(name: str) -> str | None:
    """The module of ours that `name` (a module, or a name inside one) is, or None for other libraries."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(module: str, tree: ast.AST) -> list[tuple[str, str, int]]:
    """(module imported, name taken from it or "", line) for every import statement of `module`."""
    found = []
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, "", node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"  # `from package import submodule`
                found.append((submodule if submodule in MODULES else base, alias.name, node.lineno))
        elif is_package and isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            # a package's lazy re-exports (name -> module, imported on first use) are imports too
            found.extend((value.value, key.value, node.lineno)
                         for key, value in zip(node.value.keys, node.value.values, strict=True))
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges: set[str] = set()
        for name, _, _ in imported_names(module, ast.parse(path.read_text())):
            target = resolve(name)
            if target is None:
                continue
            # The packages above the target run first, except those above the importer (already running);
            # a package named outright is an edge even when it holds the importer.
            own = {module, *ancestors(module)}
            edges.update(m for m in ancestors(target) if m in MODULES and m not in own)
            if target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle as a path a -> b -> ... -> a (one per strongly connected group of modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is a few hundred edges
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_loop(graph, sorted(group)) for group in groups]


def shortest_loop(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself (what to show in a failure)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return group


def test_the_graph_sees_late_and_type_checking_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    source = "def f():\n    from mt_scale import train\nif TYPE_CHECKING:\n    from pipelines import Loaders\n"
    names = [name for name, _, _ in imported_names("mt_scale.cli", ast.parse(source))]
    assert names == ["mt_scale.train", "pipelines"]
    exports = imported_names("pipelines", ast.parse(MODULES["pipelines"].read_text()))
    assert ("pipelines.loaders", "build_loaders") in [(module, name) for module, name, _ in exports]


def test_the_package_re_exports_resolve_and_a_dali_reader_runs_without_torch() -> None:
    import pipelines

    for name in pipelines.__all__:
        assert getattr(pipelines, name) is getattr(importlib.import_module(pipelines._EXPORTS[name]), name)
    # a DALI reader process imports its feed module only: no torch (1.5 s and hundreds of MB per reader)
    probe = "import sys, pipelines.dali_feed; print('torch' in sys.modules, 'pipelines.loaders' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["False", "False"]


def test_no_import_cycle_in_the_three_packages() -> None:
    assert len(MODULES) > 40
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(loop) for loop in cycles)


def test_packages_depend_only_downward() -> None:
    order = {"shard_tools": 0, "pipelines": 1, "mt_scale": 2}
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if order[target.split(".")[0]] > order[module.split(".")[0]]
    ]
    assert not upward, "; ".join(sorted(upward))


def test_the_cli_module_is_imported_by_nothing() -> None:
    importers = sorted(
        module
        for module, targets in import_graph().items()
        if CLI in targets and not module.endswith("__main__")  # `python -m` entry points sit beside it
    )
    assert importers == [], f"{CLI} is the top of the house; imported by {importers}"


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_no_private_name_imported_from_another_module(module: str) -> None:
    private = [
        f"line {line}: {name} from {source}"
        for source, name, line in imported_names(module, ast.parse(MODULES[module].read_text()))
        if name.startswith("_") and not name.startswith("__") and resolve(source) not in (None, module)
    ]
    assert not private, f"{module}: make these public or keep them in one module: {'; '.join(private)}"
