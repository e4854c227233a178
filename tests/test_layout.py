"""The library's import graph: no circles, and the library never imports the DVC entry points
(`stages/`) or the experiments (`experiments/`, `benchmarks/`).

Every import statement counts, a function-level one too: an import deferred into a function
hides a circle from Python's loader but not from a reader, and it is the first thing to break when
code moves. The graph is read from the sources with `ast` (nothing is imported), so the check is
cheap and sees imports on code paths no test runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_THE_LIBRARY = ("stages", "_stage", "experiments", "benchmarks", "_report", "tests")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (`from a import b` imports a, and a.b when that is a module)."""
    root = package.parent
    paths = {_module_name(path, root): path for path in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's own package upwards
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in targets if target in paths and target != name}
    return graph


def imports_outside(package: Path) -> dict[str, set[str]]:
    """module -> the top-level names it imports that belong to the project but not to the library."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops.add(node.module.split(".")[0])
        if bad := tops & set(OUTSIDE_THE_LIBRARY):
            found[_module_name(path, package.parent)] = bad
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_library_has_no_import_circle():
    assert circles(import_graph(ROOT / "pipeline")) == []


def test_the_library_imports_no_stage_experiment_or_benchmark_code():
    assert imports_outside(ROOT / "pipeline") == {}


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    return tmp_path / "pkg"


def test_the_checks_find_a_planted_circle_and_a_planted_stage_import(tmp_path):
    """The checker on a small package: a circle through a function-level import and a relative one,
    a chain that is not a circle, and a module that imports a stage."""
    package = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def later():\n    from . import c\n",
        "c.py": "import pkg.a\nimport numpy\n",
        "d.py": "from pkg.a import something\n",
        "sub/__init__.py": "from ..d import x\n",
        "sub/e.py": "from _stage import run_stage\nfrom stages import distill\n",
    })
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg", "pkg.c"} and graph["pkg.c"] == {"pkg.a"} and graph["pkg.sub"] == {"pkg.d"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert imports_outside(package) == {"pkg.sub.e": {"_stage", "stages"}}
