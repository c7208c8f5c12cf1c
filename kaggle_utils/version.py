"""Which code is running: the package version and the git commit it was built from.

``version_stamp()`` reads, in order:

1. git, when the package runs from a checkout (``python -m kaggle_utils`` in the repository): the commit
   of the work tree, ``+modified`` when tracked files differ from it;
2. ``kaggle_utils/_version.py``, which ``setup.py`` writes into every wheel it builds from a checkout
   (``make wheels``, ``pip wheel .``), so an installed wheel on Kaggle still knows its commit;
3. neither: ``commit unknown`` (e.g. a wheel built from an sdist without git).

The stamp goes into ``--version``, every checkpoint (``save_checkpoint``: key ``kaggle_utils_version``),
the exported inference file (``trained_with`` too) and ``predict``'s log and report, so a submission
can be traced back to the code that trained and predicted it.

Only the standard library is imported here.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from . import __version__

__all__ = ["version_stamp", "git_commit", "CHECKPOINT_KEY"]

#: The checkpoint entry holding the stamp of the code that wrote it.
CHECKPOINT_KEY = "kaggle_utils_version"

_PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(folder: str | os.PathLike) -> str | None:
    """``"1a2b3c4"`` (``"1a2b3c4+modified"`` with uncommitted changes to tracked files) of the git work tree
    holding ``folder``, or ``None`` when it is not in one or git is missing or slow (2 s)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=2,
                              check=True).stdout.strip()

    try:
        if git("rev-parse", "--is-inside-work-tree") != "true":
            return None
        commit = git("rev-parse", "--short=10", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+modified" if dirty else "") if commit else None


def _built_commit() -> str | None:
    """The commit ``setup.py`` recorded in ``_version.py`` when the wheel was built, if any."""
    try:
        from ._version import COMMIT  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(COMMIT) or None


def _checkout_commit() -> str | None:
    """The commit of the work tree this package runs from (a repository checkout), else ``None``."""
    if not (_PACKAGE_DIR.parent / ".git").exists():  # a file in worktrees, a folder in clones
        return None
    return git_commit(_PACKAGE_DIR.parent)


@functools.lru_cache(maxsize=1)
def version_stamp() -> str:
    """``"0.1.0 (commit 1a2b3c4d5e)"``: the package version and the commit of the running code.

    The commit comes from git when running from a checkout, else from the wheel's ``_version.py``,
    else it reads ``commit unknown``. Computed once per process.
    """
    commit = _checkout_commit() or _built_commit()
    return f"{__version__} (commit {commit or 'unknown'})"
