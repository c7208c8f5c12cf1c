"""docs/architecture.md's import-layer table matches the code: every room (module or subpackage of
``kaggle_utils``) is listed once, with exactly the rooms it imports (at module level or inside a function;
``if TYPE_CHECKING:`` blocks excluded), and at the layer its imports give it (0 for a room that imports
none, else one above the highest room it imports): so no import circle and no arrow back up."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kaggle_utils"
DOC = REPO / "docs" / "architecture.md"
NOT_ROOMS = {"__init__", "__main__", "_version"}  # the package's entry points and the build's commit stamp


def _room(path: Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    name = rel.parts[0].removesuffix(".py")
    return None if name in NOT_ROOMS or rel.parts[0] == "configs" else name


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def imported_rooms(path: Path) -> set[str]:
    """Rooms of ``kaggle_utils`` that the file at ``path`` imports (relative or absolute imports)."""
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
            out.update([target[0]] if target else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kaggle_utils" and len(parts) > 1:
                    out.add(parts[1])
    return {r for r in out if r not in NOT_ROOMS and not r.startswith("__")}


def code_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        room = _room(f)
        if room is not None:
            graph.setdefault(room, set()).update(imported_rooms(f) - {room})
    return graph


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
    """``{room: (layer, imports)}`` from the table under "## Import layers" in docs/architecture.md."""
    text = DOC.read_text()
    section = text.split("## Import layers", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[int, set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        imports = set(re.findall(r"`([a-z_]+)`", cells[2]))
        for room in re.findall(r"`([a-z_]+)`", cells[1]):
            assert room not in rows, f"{room} is listed twice in the layer table"
            rows[room] = (int(cells[0]), imports)
    return rows


def test_graph_reader_sees_relative_lazy_and_absolute_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "kaggle_utils"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ..data import x\nfrom . import b\n"
        "if TYPE_CHECKING:\n    from ..train import T\n"
        "def f():\n    from ..config import y\n    import kaggle_utils.probs\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert imported_rooms(pkg / "sub" / "a.py") == {"data", "sub", "config", "probs"}  # "sub": its own room
    with pytest.raises(ValueError, match="import circle: a -> b -> a"):
        layers({"a": {"b"}, "b": {"a"}})
    assert layers({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == {"b": 0, "a": 1, "c": 2}


def test_architecture_table_lists_every_room_with_its_imports():
    graph, table = code_graph(), doc_table()
    assert sorted(set(graph) - set(table)) == [], "rooms missing from docs/architecture.md's layer table"
    assert sorted(set(table) - set(graph)) == [], "rooms in the layer table that the package does not have"
    wrong = {room: {"table": sorted(table[room][1]), "code": sorted(graph[room])}
             for room in graph if table[room][1] != graph[room]}
    assert wrong == {}


def test_no_import_circle_and_every_room_on_the_layer_its_imports_give_it():
    graph, table = code_graph(), doc_table()
    depth = layers(graph)  # raises on a circle
    wrong = {room: {"table": table[room][0], "code": depth[room]} for room in graph if table.get(room, (None,))[0] != depth[room]}
    assert wrong == {}
