"""The package's import rules, every import counted (module top, inside functions, under TYPE_CHECKING):
no cycle among forge-batch's modules, and no arrow pointing up the layers
kernels <- models <- engine <- contract <- runner / io / plugin manager / built-in plugins <- cli."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Source folders and the package each installs as (pyproject's package-dir mapping).
ROOTS = {"forge_batch": "forge_batch", "kernels": "forge_batch.kernels", "plugins": "forge_batch.plugins"}
UPPER = ("forge_batch.runner", "forge_batch.job", "forge_batch.io", "forge_batch.cli", "forge_batch.hookspecs",
         "forge_batch.plugin_manager", "forge_batch.plugins")
FORBIDDEN = {
    "forge_batch.engine": UPPER,
    "forge_batch.models": (*UPPER, "forge_batch.engine"),
    "forge_batch.kernels": (*UPPER, "forge_batch.engine", "forge_batch.models"),
}


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def _imports(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[tuple[str, int]]]:
    """module -> {(first-party module it imports, line)}; ``from pkg import name`` counts as pkg.name when
    that is a module."""
    graph: dict[str, set[tuple[str, int]]] = {m: set() for m in modules}
    for mod, (path, is_pkg) in modules.items():
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = base[: len(base) - node.level + 1]
                    target = ".".join([*pkg, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                targets = subs + ([target] if len(subs) < len(node.names) else [])
            for t in targets:
                while t and t not in modules:  # `import a.b.c` of a name inside a module: that module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add((t, node.lineno))
    return graph


def _cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_import_cycle_among_the_package_modules() -> None:
    assert _cycles(_imports(_modules())) == []


def test_no_arrow_points_up_the_layers() -> None:
    broken = []
    for mod, targets in _imports(_modules()).items():
        for layer, forbidden in FORBIDDEN.items():
            if _within(mod, layer):
                broken += [f"{mod}:{line} imports {t}" for t, line in targets if any(_within(t, f) for f in forbidden)]
        if not _within(mod, "forge_batch.plugins"):
            # Built-in plugins arrive through the plugin manager, by name, never by a core import.
            broken += [f"{mod}:{line} imports {t}" for t, line in targets
                       if _within(t, "forge_batch.plugins")]
    assert broken == []


def test_the_checker_sees_imports_inside_functions_and_type_checking_blocks(tmp_path: Path) -> None:
    # The rules are only as good as the import finder: it must count the hidden kinds too.
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from forge_batch import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (tmp_path / "c.py").write_text("import forge_batch.a\n")
    modules = {f"forge_batch.{n}": (tmp_path / f"{n}.py", False) for n in "abc"}
    modules["forge_batch"] = (tmp_path / "__init__.py", True)
    (tmp_path / "__init__.py").write_text("")
    graph = _imports(modules)
    assert {t for t, _ in graph["forge_batch.b"]} == {"forge_batch.c"}
    assert _cycles(graph) == [["forge_batch.a", "forge_batch.b", "forge_batch.c"]]
