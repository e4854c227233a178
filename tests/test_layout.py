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

import yaml

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


# --- dvc.yaml's deps are the stages' import closures ------------------------------------------------

# Decide where results are reported, not what they are: never a reason to re-run a stage.
NOT_A_RESULT = {"pipeline.run.params", "pipeline.run.tracking"}


def _entry_imports(path: Path, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found & modules


def stage_closure(entry: Path, package: Path) -> set[str]:
    """The library files a stage's entry point imports, transitively (NOT_A_RESULT and what only
    they import left out), as repository-relative paths."""
    graph = import_graph(package)
    seen: set[str] = set()
    todo = list(_entry_imports(entry, set(graph)))
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_A_RESULT:
            continue
        seen.add(module)
        todo += graph[module]
    root = package.parent
    files = set()
    for module in seen:
        path = root / module.replace(".", "/")
        files.add((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(root).as_posix())
    return files


def declared_library_files(deps: list[str], package: Path) -> set[str]:
    root, files = package.parent, set()
    for dep in deps:
        if dep.split("/")[0] == package.name:
            path = root / dep
            found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            files |= {p.relative_to(root).as_posix() for p in found if "__pycache__" not in p.parts}
    return files


def dvc_deps_for(files: set[str], package: Path) -> list[str]:
    """The shortest dep list for `files`: a folder whenever all of its .py files are needed."""
    root = package.parent

    def needed(folder: Path) -> bool:
        return all(p.relative_to(root).as_posix() in files for p in folder.rglob("*.py") if "__pycache__" not in p.parts)

    deps, covered = [], set()
    for file in sorted(files):
        parts = Path(file).parts
        folder = None
        for depth in range(2, len(parts)):  # the outermost folder below pipeline/ that is needed whole
            candidate = root.joinpath(*parts[:depth])
            if needed(candidate):
                folder = candidate
                break
        dep = folder.relative_to(root).as_posix() if folder else file
        if dep not in covered:
            covered.add(dep)
            deps.append(dep)
    return deps


def test_every_stage_depends_on_exactly_the_library_files_it_imports():
    """A change to a library file re-runs exactly the stages that import it (NOT_A_RESULT aside):
    dvc.yaml's pipeline/ deps, folders expanded, equal each entry point's import closure. The fix
    for a failure is `dvc_deps_for(stage_closure(...))`, printed in the message."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        entry = ROOT / next(dep for dep in stage["deps"] if dep.startswith("stages/"))
        expected = stage_closure(entry, ROOT / "pipeline")
        assert declared_library_files(stage["deps"], ROOT / "pipeline") == expected, \
            f"stage {name}: deps should be {dvc_deps_for(expected, ROOT / 'pipeline')}"


def test_the_deps_check_sees_a_missing_and_a_needless_file(tmp_path):
    """Planted: a module the entry point reaches only through another, and one it never imports."""
    package = _package(tmp_path, {"__init__.py": "", "a.py": "from pkg import b\n", "b.py": "", "c.py": ""})
    entry = tmp_path / "entry.py"
    entry.write_text("from pkg import a\n")
    closure = stage_closure(entry, package)
    assert closure == {"pkg/__init__.py", "pkg/a.py", "pkg/b.py"}
    assert declared_library_files(["pkg/__init__.py", "pkg/a.py"], package) != closure  # b is missing
    assert declared_library_files(["pkg"], package) != closure  # c is needless
    assert dvc_deps_for(closure, package) == ["pkg/__init__.py", "pkg/a.py", "pkg/b.py"]
    assert declared_library_files(dvc_deps_for(closure, package), package) == closure
