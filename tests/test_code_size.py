"""Units small enough to read in one go: no class over 300 lines and no function over 80 in the package
(forge_batch/, kernels/, plugins/). A unit that grows past them is split by concept, not by line count."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80


def _too_long(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if lines > limit:
                found.append(f"{name}:{node.lineno} {node.name} ({lines} lines, at most {limit})")
    return found


def test_the_check_finds_a_long_function_and_a_long_class() -> None:
    long_function = "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    long_class = "class C:\n" + "    x = 1\n" * MAX_CLASS_LINES
    short = "def g():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
    assert [f.split(" ")[1] for f in _too_long(long_function + long_class + short, "m.py")] == ["f", "C"]


def test_no_class_over_300_lines_and_no_function_over_80() -> None:
    found = []
    for folder in ("forge_batch", "kernels", "plugins"):
        for path in sorted((REPO / folder).rglob("*.py")):
            found += _too_long(path.read_text(), str(path.relative_to(REPO)))
    assert not found, "split these by concept:\n" + "\n".join(found)
