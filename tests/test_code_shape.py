"""The code stays in pieces a reader can hold: no function in the library above 50 lines, and the scheduler's managers
small (no class in the scheduler package above 15 methods or 250 lines). Read from the source, without importing it."""

from __future__ import annotations

import ast
from pathlib import Path

import omniserve

LIBRARY = Path(omniserve.__file__).parent
MAX_FUNCTION_LINES = 50
MAX_SCHEDULER_METHODS, MAX_SCHEDULER_CLASS_LINES = 15, 250


def _nodes(folder: Path, kinds):
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, kinds):
                yield path.relative_to(LIBRARY.parent), node


def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_in_the_library_is_longer_than_50_lines():
    long = [f"{path}:{node.lineno} {node.name} ({_lines(node)} lines)"
            for path, node in _nodes(LIBRARY, (ast.FunctionDef, ast.AsyncFunctionDef))
            if _lines(node) > MAX_FUNCTION_LINES]
    assert not long, long


def test_the_scheduler_is_made_of_small_classes():
    large = []
    for path, node in _nodes(LIBRARY / "engine" / "scheduler", ast.ClassDef):
        methods = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
        if methods > MAX_SCHEDULER_METHODS or _lines(node) > MAX_SCHEDULER_CLASS_LINES:
            large.append(f"{path}:{node.lineno} {node.name} ({methods} methods, {_lines(node)} lines)")
    assert not large, large
