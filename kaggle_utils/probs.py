"""Probability volumes on disk: out-of-fold probabilities (``train``) and ``predict --save-probs``.

One writer (:func:`write_probs`) and one reader (:func:`read_probs` + :func:`as_probability`), used by
``train``'s out-of-fold pass, ``predict``, ``tune`` and ``diagnose``. Two formats, told apart by the
file's suffix (a ``{id}.json`` sidecar beside each holds ``id, scroll_id, fold, shape, dtype, format``):

- ``"uint8"`` (the default, compact): ``{id}.npz``, a zip (deflate level 1) holding ``prob``,
  ``uint8 (Z, Y, X)`` codes ``q = round(p * 255)``, and ``scale`` (255). Decoded as ``q / 255`` in
  ``float32``, at most ``1 / 510`` from the written probability. 29.5 MiB for a 320³ volume of a weak,
  noisy model, ~15 MiB for smooth probabilities, against 62.5 MiB float16 (BENCHMARKS.md "Out-of-fold
  probabilities on disk").
- ``"float16"`` (the old format, still read): ``{id}.npy``, ``float16 (Z, Y, X)`` probabilities
  (memory-mappable; 62.5 MiB per 320³ volume).

In memory, :func:`read_probs` keeps what is stored (``uint8`` codes or ``float16``), which is half the
memory of float16 for the compact format; :func:`as_probability` turns either into ``float32``
probabilities, one volume at a time.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .data import DataError, atomic_path

__all__ = [
    "PROB_FORMATS",
    "PROB_SCALE",
    "PROB_SUFFIXES",
    "DEFAULT_PROB_FORMAT",
    "check_prob_format",
    "quantize_probs",
    "as_probability",
    "write_probs",
    "read_probs",
    "find_prob_files",
]

#: formats :func:`write_probs` writes, and the suffix of each
PROB_FORMATS = {"uint8": ".npz", "float16": ".npy"}
PROB_SUFFIXES = tuple(PROB_FORMATS.values())
DEFAULT_PROB_FORMAT = "uint8"
#: ``uint8`` code of probability ``p`` is ``round(p * PROB_SCALE)``
PROB_SCALE = 255
_ZIP_LEVEL = 1  # deflate level of the compact format (measured: level 6 is 5x slower for ~10 % less)


def check_prob_format(fmt: str, what: str = "format") -> str:
    """``fmt`` if it is one of :data:`PROB_FORMATS`, else a ``ValueError`` naming ``what``."""
    if fmt not in PROB_FORMATS:
        raise ValueError(f"{what}: unknown probability format {fmt!r}; use one of {sorted(PROB_FORMATS)}")
    return fmt


def quantize_probs(prob: np.ndarray) -> np.ndarray:
    """``uint8`` codes ``round(p * 255)`` of probabilities (any float array; NaN → 0, clipped to [0, 1]).

    Args:
        prob: float ``(Z, Y, X)`` (any shape) probabilities.

    Returns:
        ``uint8`` array of the same shape; ``codes / 255`` is within ``1 / 510`` of the clipped input.
    """
    p = np.nan_to_num(np.asarray(prob, dtype=np.float32), nan=0.0)
    return np.rint(np.clip(p, 0.0, 1.0) * PROB_SCALE).astype(np.uint8)


def as_probability(stored: np.ndarray) -> np.ndarray:
    """``float32`` probabilities from what :func:`read_probs` returns.

    Args:
        stored: ``uint8`` codes of the compact format (decoded as ``q / 255``) or a float array.

    Returns:
        ``float32`` array of the same shape in ``[0, 1]``.
    """
    stored = np.asarray(stored)
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(PROB_SCALE)
    if stored.dtype.kind != "f":
        raise DataError(f"probabilities of dtype {stored.dtype}: expected uint8 codes or floats")
    return stored.astype(np.float32, copy=False)


def _write_npz(path: Path, codes: np.ndarray) -> None:
    """``codes`` as ``prob`` (+ ``scale``) in a deflate-compressed ``.npz`` that ``np.load`` reads."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL) as zf:
        for name, arr in (("prob", np.ascontiguousarray(codes)), ("scale", np.asarray(PROB_SCALE, dtype=np.int64))):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)


def write_probs(folder: str | os.PathLike, volume_id: str, scroll_id: str, prob: np.ndarray,
                fold: object = None, fmt: str = DEFAULT_PROB_FORMAT, **extra: object) -> Path:
    """Save one volume's probabilities as ``{id}.npz`` (``fmt="uint8"``) or ``{id}.npy`` (``"float16"``)
    with an ``{id}.json`` sidecar (``id, scroll_id, fold, shape, dtype, format`` and ``extra``).

    A file of the other format for the same id is removed, so a folder holds one file per id. Both
    files are written atomically.

    Args:
        folder: the output folder (created).
        prob: float ``(Z, Y, X)`` probabilities in ``[0, 1]``.
        fmt: one of :data:`PROB_FORMATS`.

    Returns:
        the probability file's path.
    """
    check_prob_format(fmt)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{volume_id}{PROB_FORMATS[fmt]}"
    with atomic_path(path) as tmp:
        if fmt == "uint8":
            _write_npz(Path(tmp), quantize_probs(prob))
        else:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(prob).astype(np.float16))
    for other in PROB_SUFFIXES:
        if other != path.suffix:
            (folder / f"{volume_id}{other}").unlink(missing_ok=True)
    meta = {"id": volume_id, "scroll_id": scroll_id, "fold": fold, "shape": list(np.shape(prob)),
            "dtype": fmt, **({"format": "p*255 rounded", "scale": PROB_SCALE} if fmt == "uint8" else {}), **extra}
    with atomic_path(folder / f"{volume_id}.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1, default=str))
    return path


def read_probs(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """One probability file as stored: ``uint8`` codes from ``.npz``, floats from ``.npy``.

    Args:
        path: an ``{id}.npz`` (compact) or ``{id}.npy`` (float16, or any float) file.
        mmap: memory-map a ``.npy`` (a compressed ``.npz`` is always read whole).

    Returns:
        ``uint8`` or float ``(Z, Y, X)``; :func:`as_probability` gives ``float32`` probabilities.

    Raises:
        DataError: unreadable or truncated file, an ``.npz`` without ``prob`` or with another scale,
            a ``.npy`` of integers, an unknown suffix.
    """
    path = Path(path)
    try:
        if path.suffix == ".npz":
            return _read_npz(path)
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            if arr.dtype.kind != "f":
                raise DataError(f"{path}: probabilities of dtype {arr.dtype}; a .npy must hold floats")
            return arr
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: unreadable probability file ({type(exc).__name__}: {exc})") from None
    raise DataError(f"{path}: not a probability file (expected {' or '.join(PROB_SUFFIXES)})")


def _read_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        if "prob" not in z.files:
            raise DataError(f"{path}: no 'prob' array (not a kaggle_utils probability file)")
        scale = int(np.asarray(z["scale"]).ravel()[0]) if "scale" in z.files else PROB_SCALE
        if scale != PROB_SCALE:
            raise DataError(f"{path}: scale {scale}, this version reads {PROB_SCALE}")
        codes = z["prob"]
    if codes.dtype != np.uint8:
        raise DataError(f"{path}: 'prob' has dtype {codes.dtype}, expected uint8 codes")
    return codes


def find_prob_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Probability files (``*.npz``, ``*.npy``) under ``folder``, sorted; sub-folders too when ``recursive``."""
    folder = Path(folder)
    walk: Any = folder.rglob if recursive else folder.glob
    return sorted(p for suffix in PROB_SUFFIXES for p in walk(f"*{suffix}"))
