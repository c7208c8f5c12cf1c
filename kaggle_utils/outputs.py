"""Output locations: checked before any work starts, and a full disk said as such.

Every command that writes (``train``, ``export``, ``diagnose``, ``tune``, ``predict``) calls
:func:`check_output` on each of its output paths first, so a read-only folder, a file where a folder
should be or a full disk stops it in one line within a second, not after hours of training or of a
post-processing search. :func:`check_output` creates nothing (a missing ``--out runs/m128`` is created when
written): it proves the nearest existing folder writable with a probe file and compares its free space with
what the command expects to write.

Writes themselves go through :class:`kaggle_utils.data.atomic_path` (temporary file + rename), which
turns a disk-full failure (``ENOSPC``, or torch's ``unexpected pos ...`` from its zip writer) into a
:class:`DiskFullError` and leaves the previous file untouched.

Only the standard library is imported here.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["MIN_FREE_BYTES", "OutputError", "DiskFullError", "check_output", "free_bytes", "is_disk_full", "disk_full_error",
           "format_bytes"]

#: Free space every output location must have at least (a report PNG, a YAML, a zip of masks start here).
MIN_FREE_BYTES = 1 << 20
#: Errors of a write that ran out of space: no space on the device, a disk quota, a file too large.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: How torch's zip writer (``torch.save`` to a path) reports a short write: it does not keep ``errno``.
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "no space left")


class OutputError(ValueError):
    """An output location that cannot be written: read-only, a file in the way, not enough space."""


class DiskFullError(OutputError):
    """A write failed (or would fail) for lack of space; the message starts with ``disk full:``."""


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes free for this user on the file system of ``folder`` (an existing folder)."""
    return int(shutil.disk_usage(folder).free)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception raised by a write means the disk (or quota) is full."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return isinstance(exc, (OSError, RuntimeError)) and any(s in text for s in _TORCH_SHORT_WRITE)


def disk_full_error(path: str | os.PathLike, exc: BaseException | None = None) -> DiskFullError:
    """The one-line :class:`DiskFullError` for a write of ``path`` that ran out of space."""
    path = Path(path)
    try:
        free = f"{format_bytes(free_bytes(path.parent))} free there"
    except OSError:
        free = "free space unknown"
    why = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
    return DiskFullError(f"disk full: could not write {path}{why}, {free}; the previous {path.name} (if any) is "
                         f"kept. Free some space or write elsewhere (--out)")


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists (``.`` for a relative path with none)."""
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def check_output(path: str | os.PathLike, kind: str = "file", need_bytes: int = MIN_FREE_BYTES,
                 what: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written, without creating anything.

    Missing folders on the way are fine (they are created when the output is written): the check probes the
    nearest folder that exists, where the first of them would be created.

    Args:
        path: the file (``kind="file"``) or folder (``kind="dir"``, e.g. a run folder) to write.
        kind: ``"file"`` (must not be a folder) or ``"dir"`` (a folder to write into).
        need_bytes: what the command expects to write there (at least :data:`MIN_FREE_BYTES` is required);
            more than the free space is an error.
        what: the option to name in messages (``--out``, ``--plot`` ...).

    Returns:
        ``Path(path)``.

    Raises:
        OutputError: a folder where a file should be (or a file where a folder should be on the way), a
            read-only folder (checked with a probe file, so it holds for root and odd mounts too).
        DiskFullError: less free space than ``need_bytes``.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputError(f"{what} {path}: is a folder, expected a file name")
    folder = path if kind == "dir" else path.parent
    base = _existing_ancestor(folder)  # where the first new folder (or the file) will be created
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ku-write-probe.", suffix=".tmp", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, exc) from None
        raise OutputError(f"{what} {path}: cannot write in {base} ({exc.strerror or exc})") from None
    free = free_bytes(base)
    if max(need_bytes, MIN_FREE_BYTES) > free:
        raise DiskFullError(f"disk full: {what} {path} needs about {format_bytes(max(need_bytes, MIN_FREE_BYTES))}, "
                            f"only {format_bytes(free)} free on {base}")
    return path
