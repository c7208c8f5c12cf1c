"""Runtime environment check for the Kaggle image: a writable numba cache.

A thing a Kaggle user cannot see coming: numba caches compiled kernels (``@njit(cache=True)`` in
:mod:`kaggle_utils.metrics.topo`) next to the source. When the package sits on a read-only path
(``/kaggle/input/...`` on ``PYTHONPATH``) and ``NUMBA_CACHE_DIR`` is unset, :func:`ensure_numba_cache_dir`
points numba at a writable temp folder. The package ``__init__`` calls it, before anything imports numba.
(The GPU checks, torch 2.9's slow half-precision conv3d and a GPU torch cannot run, are in
:mod:`kaggle_utils.device`.)

This module imports only the standard library at import time (the package ``__init__`` uses it).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__all__ = ["ensure_numba_cache_dir"]

#: Public names that moved out of this module (:func:`kaggle_utils.moved.moved_name_error`).
MOVED = {n: "kaggle_utils.device" for n in ("slow_conv3d_amp", "warn_slow_conv3d_amp", "CONV3D_AMP_WARNING",
                                            "UnsupportedGPUError", "gpu_arch_problem", "check_gpu_supported")}


def __getattr__(name: str) -> object:
    """A one-line ``AttributeError`` naming the new home of a name in :data:`MOVED`."""
    from .moved import moved_name_error

    raise moved_name_error(__name__, name, MOVED)


def _writable(path: Path) -> bool:
    """Whether numba could write its cache under ``path`` (its ``__pycache__`` or, if absent, itself)."""
    cache = path / "__pycache__"
    target = cache if cache.is_dir() else path
    return os.access(target, os.W_OK)


def ensure_numba_cache_dir(package_dir: str | os.PathLike | None = None) -> str | None:
    """Give numba a writable cache folder when the installed package is read-only.

    Does nothing when ``NUMBA_CACHE_DIR`` is already set or the package folders holding numba
    kernels (``kaggle_utils/`` and ``kaggle_utils/metrics/``) are writable. Otherwise sets
    ``NUMBA_CACHE_DIR`` (and ``numba.config.CACHE_DIR`` when numba is already imported) to
    ``<tempdir>/kaggle_utils-numba-cache``.

    Args:
        package_dir: the ``kaggle_utils`` folder to check; default: this package's.

    Returns:
        The cache folder it set, or ``None`` when nothing had to change.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    pkg = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    if all(_writable(p) for p in (pkg, pkg / "metrics") if p.is_dir()):
        return None
    cache = Path(tempfile.gettempdir()) / "kaggle_utils-numba-cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(cache)
    numba = sys.modules.get("numba")
    if numba is not None:  # numba read its config at import: update it too
        numba.config.CACHE_DIR = str(cache)
    return str(cache)
