"""docs/architecture.md's import-layer table matches the code: every module of ``kaggle_utils`` (a
package by its ``__init__``) is listed once, with exactly the modules it imports (at module level or inside a
function; ``if TYPE_CHECKING:`` blocks excluded), and at the layer its imports give it (0 for a module that
imports none, else one above the highest module it imports): so no import circle and no arrow back up."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kaggle_utils"
DOC = REPO / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    """``train/loop.py`` -> ``train.loop``; ``train/__init__.py`` -> ``train``; the top ``__init__`` -> ``kaggle_utils``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "kaggle_utils"


def package_modules() -> dict[str, Path]:
    return {module_name(f): f for f in sorted(PACKAGE.rglob("*.py")) if "configs" not in f.relative_to(PACKAGE).parts}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _dotted(parts: list[str]) -> str:
    return ".".join(parts) or "kaggle_utils"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Modules of ``kaggle_utils`` (names as :func:`module_name`) that the file at ``path`` imports: relative
    or absolute, at module level or in a function; ``from pkg import sub`` counts as importing ``pkg.sub``.
    Names that are no file of the package (the ``_version`` a wheel build writes) are left out."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    here = list(path.relative_to(PACKAGE).parts[:-1])  # the file's package, below kaggle_utils
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "kaggle_utils":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = _dotted(target + [alias.name])
                out.add(sub if sub in modules else _dotted(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kaggle_utils":
                    out.add(_dotted(parts[1:]))
    return {m for m in out if m in modules}


def code_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Longest import path below each room; ``ValueError`` naming a circle."""
    depth: dict[str, int] = {}

    def visit(room: str, stack: tuple[str, ...]) -> int:
        if room in stack:
            raise ValueError("import circle: " + " -> ".join(stack[stack.index(room):] + (room,)))
        if room not in depth:
            depth[room] = 1 + max((visit(r, stack + (room,)) for r in graph[room]), default=-1)
        return depth[room]

    for room in graph:
        visit(room, ())
    return depth


def doc_table() -> dict[str, tuple[int, set[str]]]:
    """``{module: (layer, imports)}`` from the table under "## Import layers" in docs/architecture.md."""
    text = DOC.read_text()
    section = text.split("## Import layers", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[int, set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        imports = set(re.findall(r"`([A-Za-z_][A-Za-z_.]*)`", cells[2]))
        for room in re.findall(r"`([A-Za-z_][A-Za-z_.]*)`", cells[1]):
            assert room not in rows, f"{room} is listed twice in the layer table"
            rows[room] = (int(cells[0]), imports)
    return rows


def test_graph_reader_sees_relative_lazy_and_absolute_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "kaggle_utils"
    (pkg / "sub").mkdir(parents=True)
    for name in ("data.py", "config.py", "probs.py", "train.py", "sub/__init__.py", "sub/b.py"):
        (pkg / name).write_text("")
    (pkg / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ..data import x\nfrom . import b\nfrom .b import c\n"
        "if TYPE_CHECKING:\n    from ..train import T\n"
        "def f():\n    from ..config import y\n    import kaggle_utils.probs\n    from .. import _version\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert module_name(pkg / "sub" / "a.py") == "sub.a" and module_name(pkg / "sub" / "__init__.py") == "sub"
    assert code_graph()["sub.a"] == {"data", "sub.b", "config", "probs"}
    with pytest.raises(ValueError, match="import circle: a -> b -> a"):
        layers({"a": {"b"}, "b": {"a"}})
    assert layers({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == {"b": 0, "a": 1, "c": 2}


def test_architecture_table_lists_every_room_with_its_imports():
    graph, table = code_graph(), doc_table()
    assert sorted(set(graph) - set(table)) == [], "modules missing from docs/architecture.md's layer table"
    assert sorted(set(table) - set(graph)) == [], "modules in the layer table that the package does not have"
    wrong = {room: {"table": sorted(table[room][1]), "code": sorted(graph[room])}
             for room in graph if table[room][1] != graph[room]}
    assert wrong == {}


def test_no_import_circle_and_every_room_on_the_layer_its_imports_give_it():
    graph, table = code_graph(), doc_table()
    depth = layers(graph)  # raises on a circle
    wrong = {room: {"table": table[room][0], "code": depth[room]} for room in graph if table.get(room, (None,))[0] != depth[room]}
    assert wrong == {}


def test_every_moved_public_name_points_to_a_home_that_has_it():
    """The second pass moved public names; each old spelling still resolves or fails in one line naming
    the new home, and the new home really has the name."""
    import importlib

    found = 0
    for name in sorted(package_modules()):
        if name in ("kaggle_utils", "__main__", "train_config"):
            continue
        module = importlib.import_module(name if name == "kaggle_utils" else f"kaggle_utils.{name}")
        for old, home in getattr(module, "MOVED", {}).items():
            found += 1
            assert hasattr(importlib.import_module(home), old), f"{home} has no {old}"
            try:
                getattr(module, old)
            except AttributeError as exc:
                assert str(exc) == f"kaggle_utils.{name}.{old} moved: use {home}.{old}"
    assert found >= 20  # data, submission, environment, inference, diagnostics
    with pytest.raises(ImportError, match=r"^kaggle_utils.train_config moved to kaggle_utils.train.config"):
        importlib.import_module("kaggle_utils.train_config")
    import kaggle_utils.train

    with pytest.raises(AttributeError, match="use kaggle_utils.train.LRSchedule"):
        kaggle_utils.train.WarmupSchedule  # noqa: B018
