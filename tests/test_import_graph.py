"""No module of the package imports a module that imports it back (a static check over the source, nothing is
imported): bytedeploy/ and the folders pyproject.toml installs as its subpackages (exporters/, runtimes/, plugins/,
benchmarks/).

Edges are explicit import statements (`import a.b`, `from a import b`, relative imports) between the package's own
modules; `importlib.import_module` (the family registry) is not seen. Imports that run when a module is imported
(top level, inside `try`/`if`/class bodies) may form no cycle at all. Imports inside functions may not either, except
the cycles listed in KNOWN_LAZY_CYCLES.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Function-level imports that close a cycle today, each a dispatch to a module that takes types from the caller.
KNOWN_LAZY_CYCLES: list[set[str]] = []


def package_folders() -> dict[str, str]:
    """{folder: package}: bytedeploy/ itself and pyproject's [tool.setuptools.package-dir] entries."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = config.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    return {"bytedeploy": "bytedeploy", **{folder: package for package, folder in package_dir.items()}}


def module_files() -> dict[str, Path]:
    """{dotted module name: source file} for every module of the installed package."""
    modules = {}
    for folder, package in package_folders().items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may refer to, most specific first for `from X import y` (X.y, then X)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from the module's package, one level up per extra dot
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module
    return [name for alias in node.names for name in (f"{source}.{alias.name}", source)]


def import_edges(modules: dict[str, Path], lazy: bool) -> dict[str, set[str]]:
    """{module: the package's modules it imports}; lazy=False: only imports outside function bodies."""
    edges = {}
    for module, path in modules.items():
        targets, stack = set(), [ast.parse(path.read_text(), str(path))]
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = imported_names(node, module, path.name == "__init__.py")
                if isinstance(node, ast.Import):
                    targets.update(n for n in names if n in modules)
                else:  # `from X import y`: the module X.y when there is one, else X
                    for specific, source in zip(names[::2], names[1::2]):
                        targets.add(specific if specific in modules else source)
                continue
            if not lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            stack.extend(ast.iter_child_nodes(node))
        edges[module] = {t for t in targets if t in modules and t != module}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def describe(component: set[str], edges: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} imports {', '.join(sorted(edges[m] & component))}" for m in sorted(component))


def test_the_check_sees_the_package():
    modules = module_files()
    assert {"bytedeploy.cli", "bytedeploy.deploy_cli", "bytedeploy.exporters.bundle", "bytedeploy.runtimes.ort",
            "bytedeploy.plugins.pdl", "bytedeploy.benchmarks.gpu_bench"} <= set(modules)
    assert "bytedeploy.deploy_cli" in import_edges(modules, lazy=False)["bytedeploy.cli"]  # cli mounts its COMMANDS
    assert "bytedeploy.cli" not in import_edges(modules, lazy=True)["bytedeploy.deploy_cli"]


def test_function_level_imports_count_only_when_lazy(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("try:\n    import pkg.c\nexcept ImportError:\n    pass\n")
    (tmp_path / "c.py").write_text("class C:\n    from pkg.a import f\n")
    modules = {f"pkg.{name}": tmp_path / f"{name}.py" for name in "abc"}
    assert cycles(import_edges(modules, lazy=False)) == []  # a -> b -> c -> a needs a's import inside f
    assert cycles(import_edges(modules, lazy=True)) == [{"pkg.a", "pkg.b", "pkg.c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_the_package_modules():
    tree = ast.parse("from . import bundle\nfrom .. import errors\nfrom .onnx_graphs import x")
    names = [imported_names(node, "bytedeploy.exporters.bgpt", False) for node in tree.body]
    assert names[0][0] == "bytedeploy.exporters.bundle"
    assert names[1][0] == "bytedeploy.errors"
    assert names[2][1] == "bytedeploy.exporters.onnx_graphs"


def test_no_import_cycle_at_import_time():
    edges = import_edges(module_files(), lazy=False)
    found = cycles(edges)
    assert not found, "import cycles: " + " | ".join(describe(c, edges) for c in found)


def test_no_import_cycle_through_function_level_imports():
    edges = import_edges(module_files(), lazy=True)
    found = [c for c in cycles(edges) if c not in KNOWN_LAZY_CYCLES]
    assert not found, "import cycles: " + " | ".join(describe(c, edges) for c in found)
