"""Names that moved to another module: one line saying where, instead of a bare ``AttributeError``.

A module whose public names moved (the house's second pass) lists them as ``{name: new_module}`` and
defines ``def __getattr__(name): raise moved_name_error(__name__, name, MOVED)``; Python calls it only for
names the module does not have. Config keys that were renamed are handled by ``config.CONFIG_ALIASES``
instead (they still work: saved checkpoints carry them).
"""

from __future__ import annotations

__all__ = ["moved_name_error"]


def moved_name_error(module: str, name: str, moves: dict[str, str]) -> AttributeError:
    """The error for ``module.name``: ``"kaggle_utils.X.name moved: use kaggle_utils.Y.name"`` when
    ``name`` is in ``moves`` (``{name: new module}``), else Python's usual message."""
    if name in moves:
        return AttributeError(f"{module}.{name} moved: use {moves[name]}.{name}")
    return AttributeError(f"module {module!r} has no attribute {name!r}")
