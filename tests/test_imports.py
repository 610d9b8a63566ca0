"""No import cycles between fastalign's modules.

The graph is read from the source with ``ast``, without importing anything: every ``import`` and
``from ... import`` counts, at module level or inside a function (a function-level import only
postpones a cycle to the first call; it does not remove it). ``from fastalign import hf`` is an
edge to the submodule ``fastalign.hf``; ``from fastalign import gae`` when ``gae`` is a function
re-exported by the package is an edge to ``fastalign`` itself. A package's ``__init__`` importing
its own submodules is the normal shape of a package, so a submodule is not taken to import its
parent packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (setup.py's package_dir).
PACKAGE_DIRS = {ROOT / "fastalign": "fastalign", ROOT / "kernels": "fastalign.kernels"}


def module_files(package_dirs: dict[Path, str]) -> dict[str, Path]:
    """Every module's dotted name -> its file (a package's name -> its ``__init__.py``)."""
    modules = {}
    for folder, package in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastalign modules that module ``name`` (its source at ``path``) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb level - 1 packages from this one
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(filter(None, [*anchor, base]))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    return {target for target in targets if target in known and target != name}


def import_graph(package_dirs: dict[Path, str] = PACKAGE_DIRS) -> dict[str, set[str]]:
    modules = module_files(package_dirs)
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cyclic_components(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def one_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    """A shortest import path that leaves the component's first module and comes back to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not a cycle")


def describe(graph: dict[str, set[str]], component: frozenset[str]) -> str:
    return " -> ".join(one_cycle(graph, component)) + f"  (modules: {', '.join(sorted(component))})"


def test_the_graph_sees_every_kind_of_import(tmp_path):
    sources = {
        "__init__.py": "from pkg.tools import helper\n",
        "tools.py": "def helper():\n    from pkg.sub import a\n",  # at call time: still an edge
        "sub/__init__.py": "from . import a\n",
        "sub/a.py": "from .. import tools\nimport pkg.sub.b\n",
        "sub/b.py": "from .a import name\nfrom pkg import helper\nimport os\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph({tmp_path: "pkg"})
    assert graph == {
        "pkg": {"pkg.tools"},
        "pkg.tools": {"pkg.sub.a"},
        "pkg.sub": {"pkg.sub.a"},
        "pkg.sub.a": {"pkg.tools", "pkg.sub.b"},
        "pkg.sub.b": {"pkg.sub.a", "pkg"},  # `from pkg import helper`: a name, so the package
    }
    assert cyclic_components(graph) == [{"pkg", "pkg.tools", "pkg.sub.a", "pkg.sub.b"}]
    assert one_cycle(graph, cyclic_components(graph)[0]) == [
        "pkg", "pkg.tools", "pkg.sub.a", "pkg.sub.b", "pkg"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = [describe(graph, component) for component in cyclic_components(graph)]
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)

