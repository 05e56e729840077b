"""The package's layering: no import circles inside robusteval/, and no module takes another's private names.

Read from the source (every import statement, those inside functions and under TYPE_CHECKING included),
so a circle hidden behind a deferred import or a type-only import fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "robusteval"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """(module, names taken from it, line) of every import of a robusteval module in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "robusteval":
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("robusteval"))
    return found


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module → the robusteval modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        for target, names, _ in _imports(tree):
            submodules = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
            if len(submodules) < len(names) or not names:
                submodules.add(target)  # names defined in the module itself (or a plain `import target`)
            graph[name] |= {m for m in submodules if m in modules and m != name}
    return graph


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
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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
    return found


def private_imports(modules: dict[str, ast.Module]) -> list[str]:
    """'importer:line takes module._name' for every private name taken from another module."""
    found = []
    for name, tree in modules.items():
        for target, names, line in _imports(tree):
            for taken in names:
                if taken.startswith("_") and not taken.startswith("__") and target != name:
                    found.append(f"{name}:{line} takes {target}.{taken}")
    return found


def test_there_is_no_import_circle_inside_the_package() -> None:
    assert circles(import_graph(MODULES)) == []


def test_no_module_imports_a_private_name_of_another() -> None:
    assert private_imports(MODULES) == []


def test_the_packages_that_show_the_architecture_are_there() -> None:
    top_level = sorted(name.split(".")[1] for name in MODULES if name.count(".") == 1)
    packages = {name.split(".")[1] for name in MODULES if name.count(".") >= 1 and
                (PACKAGE / name.split(".")[1]).is_dir()}
    assert {"core", "data", "records", "runs", "scale", "generative", "training", "model_zoo", "attacks",
            "smoothing", "reports", "cli"} <= packages
    # papers.py: the papers suite (claims beside measurements), a benchmark of its own beside benchmark.py.
    assert [m for m in top_level if m not in packages] == ["__main__", "benchmark", "jobs", "papers"]


# --- the checks themselves catch what they are for ------------------------------------------------------
def _parsed(sources: dict[str, str]) -> dict[str, ast.Module]:
    return {name: ast.parse(source) for name, source in sources.items()}


def test_a_circle_through_a_deferred_or_type_only_import_is_found() -> None:
    modules = _parsed({
        "robusteval.a": "from robusteval.b import B\n",
        "robusteval.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from robusteval.c import C\n",
        "robusteval.c": "def f():\n    from robusteval.a import A\n",
        "robusteval.d": "from robusteval.a import A\n",
    })
    assert circles(import_graph(modules)) == [["robusteval.a", "robusteval.b", "robusteval.c"]]


def test_a_package_importing_its_submodule_is_an_edge_to_the_submodule() -> None:
    modules = _parsed({
        "robusteval.pkg": "from robusteval.pkg import sub\n",
        "robusteval.pkg.sub": "X = 1\n",
        "robusteval.user": "from robusteval.pkg import X\n",
    })
    graph = import_graph(modules)
    assert graph["robusteval.pkg"] == {"robusteval.pkg.sub"} and graph["robusteval.user"] == {"robusteval.pkg"}
    assert circles(graph) == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from robusteval.b import _hidden\n", ["robusteval.a:1 takes robusteval.b._hidden"]),
    ("from robusteval.b import public, __version__\n", []),
    ("from robusteval.b import public as _alias\n", []),
])
def test_private_imports_are_found(source: str, expected: list[str]) -> None:
    assert private_imports(_parsed({"robusteval.a": source, "robusteval.b": "public = 1\n"})) == expected
