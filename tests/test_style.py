"""House style checks on the package source (issue 13): no function longer than ~80 lines.

Length is ``end_lineno - lineno + 1`` of the ``def`` node (docstring and nested functions
included, decorators not). Numba kernels (decorated with ``njit``/``jit``, bare, called or as
``numba.njit``) are exempt: their docstring is expected to justify their length.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kaggle_utils

PACKAGE_DIR = Path(kaggle_utils.__file__).resolve().parent
MAX_FUNCTION_LINES = 80
NUMBA_DECORATORS = frozenset({"njit", "jit"})

# "module_path::function_name" (module path relative to the package folder) -> why it may be over.
# Empty: every function is within the limit. A stale entry (no longer over) fails the test too.
ALLOWED_LONG_FUNCTIONS: dict[str, str] = {}


def _decorator_name(node: ast.expr) -> str:
    """``njit`` for ``@njit``, ``@njit(cache=True)``, ``@numba.njit`` and ``@numba.njit(...)``."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _is_numba_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(_decorator_name(d) in NUMBA_DECORATORS for d in fn.decorator_list)


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every non-numba function (methods, nested ones too) over ``limit`` lines."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                n_lines = child.end_lineno - child.lineno + 1
                if n_lines > limit and not _is_numba_kernel(child):
                    found.append((name, n_lines))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def _package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_package_has_modules():
    assert len(_package_modules()) > 10


def test_no_function_over_80_lines():
    over = {}
    for path in _package_modules():
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        for name, n_lines in long_functions(path.read_text(encoding="utf-8")):
            over[f"{rel}::{name}"] = n_lines
    unexpected = {k: v for k, v in over.items() if k not in ALLOWED_LONG_FUNCTIONS}
    assert not unexpected, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into small named steps): "
        + ", ".join(f"{k} ({v})" for k, v in sorted(unexpected.items()))
    )
    stale = sorted(set(ALLOWED_LONG_FUNCTIONS) - set(over))
    assert not stale, f"allow-list entries no longer over {MAX_FUNCTION_LINES} lines, remove them: {stale}"


def _body(n: int) -> str:
    return "".join("    x = 1\n" for _ in range(n))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n" + _body(79), []),  # 80 lines: at the limit
        ("def f():\n" + _body(80), [("f", 81)]),
        ("@njit(cache=True)\ndef k():\n" + _body(100), []),
        ("@numba.njit\ndef k():\n" + _body(100), []),
        ("@numba.jit(nopython=True)\ndef k():\n" + _body(100), []),
        ("@functools.cache\ndef f():\n" + _body(100), [("f", 101)]),
        ("class A:\n    def m(self):\n" + "".join("        x = 1\n" for _ in range(90)), [("A.m", 91)]),
        ("def outer():\n    def inner():\n" + "".join("        x = 1\n" for _ in range(90)),
         [("outer", 92), ("outer.inner", 91)]),
    ],
)
def test_long_functions_counts_known_answers(source, expected):
    assert long_functions(source) == expected
