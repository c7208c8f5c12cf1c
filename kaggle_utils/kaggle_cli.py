"""The Kaggle CLI metadata of this repository: the user name in it, the GPU a kernel asks for, and a guarded push.

The repository ships four metadata files with the placeholder owner :data:`PLACEHOLDER_USER`
(:data:`METADATA_FILES`): the submit kernel, the train kernel and the two datasets. A push with the
placeholder left fails on Kaggle's side with a permission error, or worse lands somewhere unexpected;
a kernel pushed without ``machine_shape`` has been reported to run on a P100, which the image's torch
cannot use. So:

* :func:`set_user` (``python -m kaggle_utils kaggle-setup --user NAME``) writes NAME into every owner
  slot of the four files (``id``, ``dataset_sources``, ``kernel_sources``, ``model_sources``);
* :func:`push_problems` lists what is wrong with a folder's metadata before a push, and :func:`push_command`
  builds the ``kaggle`` command line; ``python -m kaggle_utils kaggle-push DIR`` runs it only when the
  list is empty.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["PLACEHOLDER_USER", "MACHINE_SHAPE", "METADATA_FILES", "KaggleSetupError", "set_user", "push_problems",
           "push_command", "metadata_file"]

#: The owner name the repository ships with.
PLACEHOLDER_USER = "kaggleuser"
#: The GPU both kernels ask for: "GPU T4 x2" (the image's torch has no kernels for the P100 a push may get otherwise).
MACHINE_SHAPE = "NvidiaTeslaT4"
#: The metadata files holding the owner name, relative to the repository root.
METADATA_FILES = (
    "kernel-metadata.json",
    "notebooks/train/kernel-metadata.json",
    "datasets/kaggle-utils-wheels/dataset-metadata.json",
    "datasets/vesuvius-surface-models/dataset-metadata.json",
)
_OWNER_KEYS = ("id", "dataset_sources", "kernel_sources", "model_sources")
_USER_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,39}$")


class KaggleSetupError(ValueError):
    """Kaggle metadata that cannot be set up or pushed; the message names the file and what is wrong."""


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KaggleSetupError(f"{path}: not found (run from the repository root, or pass --root)") from None
    except json.JSONDecodeError as exc:
        raise KaggleSetupError(f"{path}: invalid JSON ({exc})") from None


def _with_owner(value: str, user: str) -> str:
    owner, sep, rest = value.partition("/")
    return f"{user}/{rest}" if sep and owner == PLACEHOLDER_USER else value


def set_user(root: str | os.PathLike, user: str) -> list[Path]:
    """Replace the placeholder owner by ``user`` in every file of :data:`METADATA_FILES` under ``root``.

    Args:
        root: the repository root.
        user: the Kaggle user name (lower case letters, digits, ``-``/``_``; as in ``kaggle.com/<user>``).

    Returns:
        The files that changed (already set ones are left as they are).

    Raises:
        KaggleSetupError: an invalid user name, a missing or unreadable metadata file (nothing is written then).
    """
    user = user.strip()
    if not _USER_RE.match(user):
        raise KaggleSetupError(f"--user {user!r}: not a Kaggle user name (lower case letters, digits, '-' or '_', "
                               f"as in kaggle.com/<user>)")
    root = Path(root)
    metas = {root / rel: _read(root / rel) for rel in METADATA_FILES}  # all read before any is written
    changed = []
    for path, meta in metas.items():
        new = dict(meta)
        for key in _OWNER_KEYS:
            if isinstance(meta.get(key), str):
                new[key] = _with_owner(meta[key], user)
            elif isinstance(meta.get(key), list):
                new[key] = [_with_owner(v, user) if isinstance(v, str) else v for v in meta[key]]
        if new != meta:
            from .data import atomic_path

            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(new, indent=2) + "\n")
            changed.append(path)
    return changed


def metadata_file(folder: str | os.PathLike) -> Path:
    """The ``kernel-metadata.json`` or ``dataset-metadata.json`` of a push folder.

    Raises:
        KaggleSetupError: neither (or both) is there.
    """
    folder = Path(folder)
    found = [folder / n for n in ("kernel-metadata.json", "dataset-metadata.json") if (folder / n).is_file()]
    if len(found) != 1:
        raise KaggleSetupError(f"{folder}: expected one kernel-metadata.json or dataset-metadata.json, found "
                               f"{[p.name for p in found] or 'none'}")
    return found[0]


def push_problems(folder: str | os.PathLike) -> list[str]:
    """What stops a push of ``folder``: the placeholder owner anywhere, a GPU kernel without ``machine_shape``.

    Returns:
        One line per problem, naming the file; empty when the push may go ahead.
    """
    path = metadata_file(folder)
    meta = _read(path)
    problems = []
    slots = [meta.get(k) for k in _OWNER_KEYS]
    values = [v for s in slots for v in (s if isinstance(s, list) else [s]) if isinstance(v, str)]
    left = sorted({v for v in values if v.partition("/")[0] == PLACEHOLDER_USER})
    if left:
        problems.append(f"{path}: still owned by the placeholder {PLACEHOLDER_USER!r} ({', '.join(left)}); run "
                        f"python -m kaggle_utils kaggle-setup --user YOUR_KAGGLE_NAME")
    if path.name == "kernel-metadata.json" and meta.get("enable_gpu") and meta.get("machine_shape") != MACHINE_SHAPE:
        problems.append(f'{path}: "machine_shape" is {meta.get("machine_shape")!r}, expected {MACHINE_SHAPE!r} '
                        f"(without it a push may land on a P100, which the image's torch cannot run)")
    return problems


def push_command(folder: str | os.PathLike, message: str | None = None, dir_mode: str | None = None) -> list[str]:
    """The ``kaggle`` command that pushes ``folder``: ``kernels push`` for a kernel; for a dataset ``datasets
    create`` (first time) or, with ``message``, ``datasets version -m MESSAGE``; ``--dir-mode`` passed on."""
    path = metadata_file(folder)
    if path.name == "kernel-metadata.json":
        return ["kaggle", "kernels", "push", "-p", str(folder)]
    cmd = ["kaggle", "datasets", "version", "-p", str(folder), "-m", message] if message else \
        ["kaggle", "datasets", "create", "-p", str(folder)]
    return cmd + (["--dir-mode", dir_mode] if dir_mode else [])
