"""The package's shape, checked from the source: imports point one way, no circles, recipes
never import each other, and no module or function outgrows one clear job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "cnnft"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 70
TRAIN_RECIPE_LINES = 300

# what each layer may import (besides itself and the ground: config, errors, files, safeload,
# progress, ranges, yamlfile)
GROUND = {"config", "errors", "files", "ranges", "safeload", "schemaerrors", "progress", "yamlfile", "__init__"}
MAY_IMPORT = {
    "models": set(),
    "data": {"models"},
    "results": {"data"},
    "training": {"data", "models", "results"},
    "tuning": {"data", "models", "training", "results", "run"},
    "run": {"data", "models", "training", "results"},
    "recipes": {"data", "models", "training", "results", "run", "tuning"},
    "cli": {"recipes", "data", "models", "training", "results", "run", "tuning"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The cnnft modules ``name`` imports, anywhere in the file (function-level imports too)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cnnft"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("cnnft"):
                continue
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package_graph() -> dict[str, set[str]]:
    """Imports between subpackages (cycles among rooms, not only among modules)."""
    g: dict[str, set[str]] = {}
    for mod, deps in GRAPH.items():
        a = _layer(mod)
        if a in GROUND or a == "__main__":
            continue
        g.setdefault(a, set())
        g[a].update(_layer(d) for d in deps if _layer(d) not in GROUND and _layer(d) != a)
    for deps in list(g.values()):
        for d in deps:
            g.setdefault(d, set())
    return g


def test_no_import_circle_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_circle_between_subpackages():
    assert _cycles(_package_graph()) == []


def test_imports_point_one_way():
    wrong = []
    for mod, deps in GRAPH.items():
        layer = _layer(mod)
        if mod == "cnnft.__main__":
            allowed = {"cli"}
        elif layer in GROUND:
            allowed = GROUND
        else:
            allowed = MAY_IMPORT.get(layer, set()) | GROUND | {layer}
        wrong += [f"{mod} -> {d}" for d in deps if _layer(d) not in allowed]
    assert wrong == []


def test_no_recipe_imports_another_recipe():
    recipes = {m for m in MODULES if m.startswith("cnnft.recipes.")}
    assert [f"{m} -> {d}" for m in recipes for d in GRAPH[m] if d in recipes] == []


def test_nothing_imports_the_cli_but_the_entry_point():
    assert [m for m, deps in GRAPH.items() if _layer(m) != "cli" and m != "cnnft.__main__"
            and any(_layer(d) == "cli" for d in deps)] == []


def test_modules_stay_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}
    assert len(MODULES["cnnft.recipes.train"].read_text(encoding="utf-8").splitlines()) <= TRAIN_RECIPE_LINES


def test_functions_stay_short():
    long = []
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert long == []


def test_each_subpackage_says_what_lives_there():
    for pkg in PKG.iterdir():
        if (pkg / "__init__.py").is_file():
            doc = ast.get_docstring(ast.parse((pkg / "__init__.py").read_text(encoding="utf-8")))
            assert doc and len(doc.splitlines()) >= 2, pkg.name


@pytest.mark.parametrize("cycle", [{"a": {"b"}, "b": {"a"}}, {"a": {"b"}, "b": {"c"}, "c": {"a"}}])
def test_the_circle_finder_finds_circles(cycle):
    assert _cycles(cycle) == [sorted(cycle)]
