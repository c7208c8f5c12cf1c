"""The submission: ``submission.zip`` with one ``{id}.tif`` (``uint8 (Z, Y, X)``, 0/1) per test id.

Three pieces (the prediction pipeline that fills the zip is :mod:`kaggle_utils.predict`):

- :func:`write_submission` streams ``(id, mask)`` pairs into the zip one volume at a time
  (memory stays flat for ~120 volumes) and writes atomically (temp file beside the target, then
  ``os.replace``): a crash leaves either the old zip or none, never half of one. The TIFFs are
  zlib-compressed (:data:`SUBMISSION_TIFF_COMPRESSION`): tifffile writes that with Python's own
  zlib (no ``imagecodecs``, which Kaggle's image lacks) and the scorer's PIL reads it.
- :func:`validate_submission` checks a zip against ``test.csv`` and the test images: ids
  (missing, extra, duplicated), entry names (no directories, no ``..``, no absolute paths,
  ``.tif`` suffix), readable TIFFs, shapes, dtype ``uint8`` and values in ``{0, 1}``.
- :func:`list_volumes` / :func:`read_located` find and read the volumes of a zip, a folder of
  ``{id}.tif`` or a single TIFF (the scorer and ``diagnose`` read predictions through them), skipping
  operating-system clutter (:func:`is_os_metadata`).

This module imports nothing from :mod:`kaggle_utils.predict` (the arrow goes one way: predict → submission).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .data import DataError, atomic_path, load_index, mask_shape, read_tiff, read_tiff_shape
from .moved import moved_name_error

__all__ = [
    "SubmissionError",
    "SUBMISSION_TIFF_COMPRESSION",
    "OutputPathError",
    "check_out_zip",
    "check_volume_id",
    "as_submission_mask",
    "write_submission",
    "validate_submission",
    "read_tiff_shape",
    "TIF_SUFFIXES",
    "Locator",
    "list_volumes",
    "read_located",
    "describe_location",
    "is_os_metadata",
    "zip_metadata_warning",
]

#: Public names that moved out of this module (:func:`kaggle_utils.moved.moved_name_error`): the prediction
#: pipeline lives in :mod:`kaggle_utils.predict`.
MOVED = {n: "kaggle_utils.predict" for n in ("PredictReport", "predict_dataset", "plan_tta", "staging_dir",
                                             "DEFAULT_TIME_LIMIT_S")}


def __getattr__(name: str) -> Any:
    """A one-line ``AttributeError`` naming the new home of a name in :data:`MOVED`."""
    raise moved_name_error(__name__, name, MOVED)


class SubmissionError(ValueError):
    """A submission that Kaggle would reject or score wrongly. The message says what and where."""


SUBMISSION_TIFF_COMPRESSION = "zlib"
"""Compression of the submitted TIFFs: Adobe deflate (TIFF compression 8), which tifffile encodes and
decodes with Python's ``zlib`` (no ``imagecodecs``) and PIL reads page by page. A 320^3 sheet-like
mask takes ~0.29 MB (~0.2 MB inside a ``ZIP_DEFLATED`` zip) instead of 32.8 MB uncompressed."""


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

_ID_BAD = re.compile(r"[/\\\x00]")


def check_volume_id(volume_id: str) -> str:
    """``volume_id`` as a string, if it is a plain file-name stem (the ``{id}.tif`` entry name is safe).

    Raises:
        SubmissionError: empty, ``.``/``..``, or containing a path separator or NUL.
    """
    volume_id = str(volume_id)
    if not volume_id or volume_id in (".", "..") or _ID_BAD.search(volume_id):
        raise SubmissionError(f"invalid volume id {volume_id!r}: must be a plain file name stem")
    return volume_id


def as_submission_mask(volume_id: str, mask: np.ndarray) -> np.ndarray:
    """``mask`` as the submission format: contiguous ``uint8 (Z, Y, X)`` in ``{0, 1}`` (bool/integer masks:
    non-zero is 1).

    Raises:
        SubmissionError: not 3D, or a float array (probabilities must be thresholded first).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise SubmissionError(f"{volume_id}: mask must be 3D (Z, Y, X), got shape {tuple(mask.shape)}")
    if mask.dtype == np.uint8 and (mask.size == 0 or int(mask.max()) <= 1):
        return np.ascontiguousarray(mask)
    if mask.dtype == bool or np.issubdtype(mask.dtype, np.integer):
        return (mask != 0).astype(np.uint8)
    raise SubmissionError(
        f"{volume_id}: mask dtype {mask.dtype} is not binary; threshold probabilities first "
        "(kaggle_utils.postprocess.postprocess): the scorer counts any non-zero value as foreground"
    )


def _tiff_bytes(mask: np.ndarray) -> bytes:
    """A ``uint8 (Z, Y, X)`` mask as a multi-page TIFF (one page per z) in the submission format."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, mask, compression=SUBMISSION_TIFF_COMPRESSION, photometric="minisblack")
    return buf.getvalue()


class OutputPathError(SubmissionError):
    """The zip cannot be written where asked (a folder, a read-only place). Found before any work."""


def check_out_zip(out_zip: str | os.PathLike) -> Path:
    """Check, before any work, that a zip can be written at ``out_zip`` (its folder is created).

    Raises:
        OutputPathError: ``out_zip`` is a folder, its parent is a file, or the folder is not writable.
    """
    from .outputs import OutputError, check_output

    out_zip = Path(out_zip)
    if out_zip.is_dir():
        raise OutputPathError(f"{out_zip}: is a folder; --out must be the zip file to write, "
                              f"e.g. {out_zip / 'submission.zip'}")
    try:
        return check_output(out_zip, "file", what="--out")  # the shared check: writable, parents, free space
    except OutputError as exc:
        raise OutputPathError(str(exc)) from None


def write_submission(
    items: Iterable[tuple[str, np.ndarray | str | os.PathLike]],
    out_zip: str | os.PathLike,
    compression: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """Write ``submission.zip`` atomically, one volume at a time.

    Args:
        items: ``(id, mask)`` pairs; ``mask`` is ``uint8``/``bool``/integer ``(Z, Y, X)``, written
            as a zlib-compressed ``uint8`` 0/1 TIFF (any non-zero → 1), or the path of a TIFF
            already in that format (a mask staged by :func:`kaggle_utils.predict.predict_dataset`), copied as it is.
            Float masks are refused. May be a generator: only one mask is held at a time.
        out_zip: destination path (its folder is created).
        compression: zip member compression; ``ZIP_DEFLATED`` (default) shrinks the zlib TIFFs by
            another ~30 % (a 320^3 mask: 0.29 → 0.20 MB).

    Returns:
        ``Path(out_zip)``.

    Raises:
        SubmissionError: bad id, duplicate id, non-3D or float mask. On any exception nothing is
            left at ``out_zip`` (an existing file there is kept unchanged) and no temp file remains.
    """
    out_zip = Path(out_zip)
    seen: set[str] = set()
    with atomic_path(out_zip) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=compression, allowZip64=True) as zf:
            for volume_id, mask in items:
                volume_id = check_volume_id(volume_id)
                if volume_id in seen:
                    raise SubmissionError(f"{out_zip}: id {volume_id!r} written twice")
                seen.add(volume_id)
                if isinstance(mask, (str, os.PathLike)):
                    zf.write(mask, f"{volume_id}.tif")
                else:
                    zf.writestr(f"{volume_id}.tif", _tiff_bytes(as_submission_mask(volume_id, mask)))
                del mask
    return out_zip


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _entry_name_problem(name: str) -> str | None:
    if name.endswith("/") or name.endswith("\\"):
        return "is a directory entry"
    if name.startswith("/") or name.startswith("\\") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        return "contains '..'"
    if len(parts) > 1:
        return "is inside a folder (entries must be top-level '{id}.tif')"
    if not name.endswith(".tif"):
        return "does not end in '.tif'"
    return None


def _check_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, expected_shape: tuple[int, ...] | None) -> list[str]:
    name = info.filename
    try:
        data = zf.read(info)
    except Exception as exc:  # BadZipFile (CRC), zlib errors, ...
        return [f"{name}: cannot read zip entry ({type(exc).__name__}: {exc})"]
    try:
        vol = read_tiff(data, name)
    except DataError as exc:  # MissingCodecError too: its message says what to install
        return [str(exc)]
    del data
    problems = []
    if expected_shape is not None and tuple(vol.shape) != tuple(expected_shape):
        problems.append(f"{name}: shape {tuple(vol.shape)} != test image shape {tuple(expected_shape)}")
    if vol.dtype != np.uint8:
        problems.append(f"{name}: dtype {vol.dtype}, expected uint8")
    if vol.size and vol.dtype.kind in "biuf":
        vmin, vmax = vol.min(), vol.max()
        if vmin < 0 or vmax > 1 or (vol.dtype.kind == "f" and not np.isin(vol, (0, 1)).all()):
            problems.append(
                f"{name}: values outside {{0, 1}} (min {vmin}, max {vmax}); the scorer counts any "
                "non-zero value as foreground, so this is only safe if that is intended"
            )
    return problems


def validate_submission(zip_path: str | os.PathLike, data_dir: str | os.PathLike) -> list[str]:
    """Check a submission zip against the test set of ``data_dir``.

    Args:
        zip_path: the ``submission.zip`` to check.
        data_dir: competition-layout folder with ``test.csv`` and ``test_images/``.

    Returns:
        Problems as one-line messages naming the entry; an empty list means valid. Checked: the
        file is a zip; entry names (no directories, ``..``, absolute paths or folders; ``.tif``
        suffix; no duplicates); every test id present and no extra ids; each entry a readable
        TIFF with the shape of its test image, dtype ``uint8``, values in ``{0, 1}``.

    Raises:
        DataError: ``data_dir`` has no readable ``test.csv``/test images (a problem of the data,
            not of the submission).
    """
    zip_path = Path(zip_path)
    index = load_index(data_dir, "test")
    if not zip_path.is_file():
        return [f"{zip_path}: file not found"]
    if not zipfile.is_zipfile(zip_path):
        return [f"{zip_path}: not a zip file"]
    problems: list[str] = []
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [f"{zip_path}: not a readable zip file ({exc})"]
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        expected = {r.id: r for r in index}
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        for n, c in counts.items():
            if c > 1:
                problems.append(f"{n}: entry appears {c} times")
        good: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            bad = _entry_name_problem(info.filename)
            if bad:
                problems.append(f"{info.filename!r}: entry name {bad}")
                continue
            vid = info.filename[: -len(".tif")]
            if vid not in expected:
                problems.append(f"{info.filename}: extra entry, id {vid!r} is not in test.csv")
                continue
            good.setdefault(vid, info)
        missing = [vid for vid in expected if vid not in good]
        if missing:
            problems.append(
                f"{len(missing)} test id(s) missing from {zip_path.name}: "
                + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            )
        for vid, info in good.items():
            try:
                shape = mask_shape(expected[vid].image_path)
            except DataError as exc:
                problems.append(str(exc))
                shape = None
            problems.extend(_check_entry(zf, info, shape))
    return problems


# ----------------------------------------------------------------------------------------------
# Reading: the volumes of a .tif, a folder of {id}.tif, a submission.zip or a competition-layout folder
# (the scorer, diagnose)
# ----------------------------------------------------------------------------------------------

# a volume's location: ("file", path) or ("zip", zip_path, member); small and picklable
Locator = tuple[str, ...]
TIF_SUFFIXES = (".tif", ".tiff")


#: Entries an operating system adds when it zips a folder: never predictions, never scored.
_OS_METADATA_DIRS = ("__MACOSX",)
_OS_METADATA_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


def is_os_metadata(entry: str) -> bool:
    """Whether a zip entry is operating-system clutter: ``__MACOSX/...`` (macOS resource forks, also
    named ``._{id}.tif``), ``.DS_Store``, ``._*`` AppleDouble files, Windows' ``Thumbs.db``/``desktop.ini``."""
    parts = [p for p in entry.replace("\\", "/").split("/") if p]
    if not parts:
        return False
    return any(p in _OS_METADATA_DIRS for p in parts) or parts[-1] in _OS_METADATA_FILES or parts[-1].startswith("._")


def zip_metadata_warning(zip_path: str | os.PathLike) -> str | None:
    """One line naming the OS clutter entries of a prediction zip that scoring ignores, or ``None``.

    ``score`` ignores them, as Kaggle's scorer reads only the ``{id}.tif`` entries it expects, so the number
    is that of the real entries; ``validate-submission`` still refuses a zip that carries them.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            junk = [n for n in zf.namelist() if is_os_metadata(n)]
    except (zipfile.BadZipFile, OSError):
        return None  # list_volumes reports an unreadable zip
    if not junk:
        return None
    shown = ", ".join(junk[:4]) + (f" and {len(junk) - 4} more" if len(junk) > 4 else "")
    return (f"{zip_path}: ignored {len(junk)} operating-system entr{'y' if len(junk) == 1 else 'ies'} ({shown}); "
            f"only the {{id}}.tif entries were scored. Remove them before submitting "
            f"(zip -d {Path(zip_path).name} '__MACOSX/*' '*.DS_Store'), validate-submission refuses them")


def list_volumes(source: str | os.PathLike, *, role: str = "pred") -> dict[str, Locator]:
    """Volumes of a source, by id.

    Args:
        source: a ``.tif`` file (id = file stem), a folder of ``{id}.tif``, a ``.zip`` holding
            ``{id}.tif`` (predictions only) or, for ``role="gt"``, a competition-layout folder
            (its ``train_labels/`` is used).
        role: ``"pred"`` or ``"gt"`` (only used in messages and for the zip/layout rules).

    Returns:
        ``{id: locator}`` sorted by id.

    Raises:
        DataError: missing path, unsupported file, zip given as ground truth, no volumes found.
    """
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: {role} source not found")
    out: dict[str, Locator] = {}
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in TIF_SUFFIXES:
            out[path.stem] = ("file", str(path))
        elif suffix == ".zip":
            if role == "gt":
                raise DataError(f"{path}: ground truth cannot be a zip; give a .tif or a folder")
            try:
                with zipfile.ZipFile(path) as zf:
                    names = zf.namelist()
            except zipfile.BadZipFile as exc:
                raise DataError(f"{path}: not a readable zip ({exc})") from None
            for name in names:
                member = Path(name)
                if is_os_metadata(name):  # never a prediction, even a __MACOSX/{id}.tif copy
                    continue
                if member.suffix.lower() in TIF_SUFFIXES and not member.name.startswith("."):
                    if member.stem in out:
                        raise DataError(f"{path}: id {member.stem!r} appears twice in the zip")
                    out[member.stem] = ("zip", str(path), name)
        else:
            raise DataError(f"{path}: expected a .tif, a .zip or a folder as {role} source")
    else:
        folder = path
        if role == "gt" and (path / "train_labels").is_dir():
            folder = path / "train_labels"
        for f in folder.iterdir():
            if f.is_file() and f.suffix.lower() in TIF_SUFFIXES and not f.name.startswith("."):
                out[f.stem] = ("file", str(f))
    if not out:
        raise DataError(f"{path}: no .tif volumes found in {role} source")
    return dict(sorted(out.items()))


def describe_location(loc: Locator) -> str:
    """``path`` or ``zip_path:member``: how messages name a located volume."""
    return f"{loc[1]}:{loc[2]}" if loc[0] == "zip" else loc[1]


def read_located(loc: Locator) -> np.ndarray:
    """Read the TIFF a :func:`list_volumes` locator points at (a file or a zip member), as stored.

    A truncated multi-page TIFF is an error here, not a volume with fewer pages: tifffile only
    *logs* a bad page offset and returns the pages before it (a 96^3 volume cut after its first
    page reads as ``(96, 96)``), so its log records are collected and turned into the error.

    Returns:
        the stored array (any dtype), usually ``(Z, Y, X)``.

    Raises:
        MissingCodecError: the compression needs a codec that is not installed (LZW without
            ``imagecodecs``); the message says what to install.
        DataError: unreadable, truncated or corrupt TIFF: one line naming the file (and zip
            member) with "corrupt TIFF" in it.
    """
    where = describe_location(loc)
    if loc[0] != "zip":
        return read_tiff(loc[1], where)
    try:
        with zipfile.ZipFile(loc[1]) as zf:
            raw = zf.read(loc[2])
    except Exception as exc:  # zipfile raises many types for broken archives
        raise DataError(f"{where}: corrupt TIFF, truncated or damaged ({type(exc).__name__}: {exc})") from None
    return read_tiff(raw, where)
