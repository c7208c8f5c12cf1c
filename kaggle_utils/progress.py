"""Progress bars: the one place that builds them, drawn only where someone watches.

A tqdm bar redraws itself with carriage returns. On a terminal that is one live line; in a log (a Kaggle
batch run, ``torchrun`` output piped into a notebook, ``nohup``, CI) every redraw stays, and an 8-hour
training writes megabyte-long lines. :func:`progress_bar` therefore draws a bar only when

* the caller asked for one (``progress=True``; the CLI's ``--no-progress`` says no), and
* someone watches: stderr is a terminal, or an interactive notebook (a Jupyter kernel, not a Kaggle
  batch run: ``KAGGLE_KERNEL_RUN_TYPE=Batch`` is set by "Save & Run All" and ``kaggle kernels push``).

``KAGGLE_UTILS_PROGRESS=0`` turns every bar off, ``=1`` forces them on; forced on where nobody watches,
a bar redraws at most every :data:`LOG_INTERVAL_S` seconds in plain ASCII. The epoch, validation and
prediction log lines are written either way.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

__all__ = ["progress_bar", "progress_wanted", "watched", "LOG_INTERVAL_S", "ENV"]

#: Environment variable: ``0`` (off), ``1`` (on), unset (automatic).
ENV = "KAGGLE_UTILS_PROGRESS"
#: Seconds between redraws of a bar forced on where nobody watches (a log).
LOG_INTERVAL_S = 60.0


def _in_notebook_kernel() -> bool:
    """Whether this process is a Jupyter/IPython kernel (where tqdm.auto draws a widget)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    ip = get() if callable(get) else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def watched() -> bool:
    """Whether someone is likely watching the bars: a terminal on stderr, or an interactive notebook."""
    if _in_notebook_kernel():
        return os.environ.get("KAGGLE_KERNEL_RUN_TYPE", "").lower() != "batch"
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_wanted(requested: bool = True) -> bool:
    """Whether a bar is drawn: ``requested`` and (``KAGGLE_UTILS_PROGRESS`` or :func:`watched`)."""
    if not requested:
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "off", "false", "no"):
        return False
    if forced in ("1", "on", "true", "yes"):
        return True
    return watched()


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any):
    """A ``tqdm.auto`` bar (same arguments), disabled unless :func:`progress_wanted`.

    Args:
        iterable: what to iterate over (or ``None`` and ``total=`` with manual ``update``).
        enabled: the caller's wish (e.g. ``progress``; the CLI's ``--no-progress`` passes ``False``).
        **kwargs: tqdm arguments (``total``, ``desc``, ``unit``, ``leave`` ...).

    Returns:
        The bar; a disabled one still iterates and accepts ``update``/``close``.
    """
    from tqdm.auto import tqdm

    show = progress_wanted(enabled)
    if show and not watched():  # forced on in a log: rare, short, plain redraws
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, disable=not show, **kwargs)
