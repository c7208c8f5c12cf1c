"""Competition data I/O: volumes, the dataset index, scroll-grouped folds, intensity normalization.

Volumes are numpy ``uint8 (Z, Y, X)`` arrays on disk and in memory (axis order z, y, x as Kaggle
ships them). Labels are ``uint8 (Z, Y, X)`` with values ``0`` background, ``1`` surface and
``2`` unlabeled (:data:`IGNORE_LABEL`).

Every problem with the input raises :class:`DataError` whose message names the file and the
problem, never a traceback from deep inside numpy or tifffile.
"""

from __future__ import annotations

import csv
import glob
import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .outputs import DiskFullError, disk_full_error, is_disk_full

__all__ = [
    "KAGGLE_SLUG",
    "IGNORE_LABEL",
    "LABEL_VALUES",
    "DataError",
    "MissingCodecError",
    "CODEC_INSTALL_HINT",
    "tiff_codec_problem",
    "VolumeRecord",
    "DatasetIndex",
    "read_volume",
    "read_label",
    "read_tiff",
    "read_tiff_shape",
    "check_tiff_header",
    "mask_shape",
    "write_volume",
    "atomic_path",
    "find_data_root",
    "load_index",
    "make_folds",
    "split_fold",
    "IntensityStats",
    "intensity_stats",
    "normalize_intensity",
    "label_shares",
    "check_data",
]

KAGGLE_SLUG = "vesuvius-challenge-surface-detection"
IGNORE_LABEL = 2
LABEL_VALUES = (0, 1, 2)


class DataError(ValueError):
    """Bad competition data. The message names the file (or CSV) and what is wrong with it."""


class MissingCodecError(DataError):
    """A TIFF uses a compression this Python cannot decode (or encode): a setup problem, not bad data.

    The competition's TIFFs are LZW-compressed, which tifffile only decodes with the
    ``imagecodecs`` package (Kaggle's image does not have it). The message names the file, the
    compression and what to install (:data:`CODEC_INSTALL_HINT`).
    """


#: What to do when ``imagecodecs`` is missing (the text of :class:`MissingCodecError`).
CODEC_INSTALL_HINT = (
    "pip install imagecodecs (offline on Kaggle: attach the kaggle-utils-wheels dataset built for this Python "
    "and run pip install --no-index --no-deps /kaggle/input/kaggle-utils-wheels/*.whl)"
)


# ----------------------------------------------------------------------------------------------
# Volumes
# ----------------------------------------------------------------------------------------------


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a TIFF file")


def _tifffile_has_imagecodecs() -> bool:
    """Whether tifffile runs with the real ``imagecodecs`` (not its pure-Python fallback)."""
    import tifffile

    module = getattr(getattr(tifffile, "tifffile", None), "imagecodecs", None)
    if module is not None:  # tifffile falls back to its own ``_imagecodecs`` when the import fails
        return not getattr(module, "__name__", "").rsplit(".", 1)[-1].startswith("_")
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True


def _compression_name(code: int) -> str:
    import tifffile

    try:
        return tifffile.COMPRESSION(code).name
    except ValueError:
        return f"compression {code}"


def _codec_message(what: str, code: int, action: str = "decode") -> str:
    name = _compression_name(code)
    if not _tifffile_has_imagecodecs():
        return (f"{what}: {name}-compressed TIFF; tifffile cannot {action} {name} without the 'imagecodecs' "
                f"package, which is not installed: {CODEC_INSTALL_HINT}")
    try:
        import imagecodecs

        version = f" {imagecodecs.__version__}"
    except Exception:  # pragma: no cover - imagecodecs importable but broken
        version = ""
    return (f"{what}: {name}-compressed TIFF; the installed imagecodecs{version} cannot {action} {name}: "
            "pip install -U imagecodecs")


def tiff_codec_problem(tif: Any, what: str | os.PathLike = "TIFF") -> str | None:
    """Say whether every page of an open TIFF can be decoded here, without decoding any pixels.

    Compares each page's compression tag with the codecs tifffile can resolve in this environment
    (``tifffile.TIFF.DECOMPRESSORS``, which knows whether ``imagecodecs`` is installed), so a
    missing codec is never mistaken for a corrupt file.

    Args:
        tif: an open ``tifffile.TiffFile``.
        what: the file name to put in the message.

    Returns:
        ``None`` when all pages are decodable, else one line naming the file, the compression and
        the package to install (:data:`CODEC_INSTALL_HINT`).
    """
    import tifffile

    codes = sorted({int(getattr(page, "compression", 1)) for page in tif.pages})
    for code in codes:
        try:
            decodable = code in tifffile.TIFF.DECOMPRESSORS
        except Exception:  # an unexpected tifffile internals change: let the real read decide
            decodable = True
        if not decodable:
            return _codec_message(str(what), code)
    return None


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """Read one competition volume (image or label) from a multi-page TIFF.

    Args:
        path: ``.tif`` file (LZW-compressed TIFFs need ``imagecodecs``; uncompressed, zlib and
            packbits TIFFs do not).

    Returns:
        ``uint8 (Z, Y, X)`` array.

    Raises:
        MissingCodecError: the file's compression needs a codec that is not installed (LZW without
            ``imagecodecs``); the message says what to install.
        DataError: missing file, directory, truncated/corrupt TIFF, not 3D, not uint8.
    """
    path = Path(path)
    _check_is_file(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), expected a TIFF volume")
    volume = read_tiff(path)
    if volume.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D volume (z, y, x), got {volume.ndim}D array of shape "
            f"{tuple(volume.shape)}"
        )
    if volume.dtype != np.uint8:
        raise DataError(f"{path}: expected dtype uint8, got {volume.dtype}")
    return np.ascontiguousarray(volume)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label volume and check its values are in ``{0, 1, 2}``.

    Returns:
        ``uint8 (Z, Y, X)`` array with values 0 (background), 1 (surface), 2 (ignore).
    """
    label = read_volume(path)
    if label.size and int(label.max()) > 2:
        values = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
        bad = [int(v) for v in values if v > 2]
        raise DataError(
            f"{path}: label values must be in {{0, 1, 2}}, found {bad[:10]}"
            + (" ..." if len(bad) > 10 else "")
        )
    return label


class _TiffErrors(logging.Handler):
    """Collects the ERROR records tifffile logs (instead of raising) while it reads a damaged file, in
    this thread only (threads reading other files at once log to the same logger)."""

    def __init__(self) -> None:
        import threading

        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _corrupt_tiff_is_a_data_error(name: str | os.PathLike) -> Iterator[None]:
    """Run a tifffile read so that any damage is one :class:`DataError` naming ``name``: "corrupt TIFF,
    truncated or damaged (...)". tifffile only *logs* some damage (bad page offsets: the pages before it are
    returned), so its ERROR records of this thread are collected and turned into the error too.
    :class:`MissingCodecError` (a setup problem, not bad data) passes through."""
    errors = _TiffErrors()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(errors)
    propagate, tiff_log.propagate = tiff_log.propagate, False  # no stray "<TiffPages> invalid offset" lines
    try:
        yield
        if errors.messages:
            raise ValueError("; ".join(errors.messages[:2]))
    except MissingCodecError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise DataError(f"{name}: corrupt TIFF, truncated or damaged ({type(exc).__name__}: {exc})") from None
    finally:
        tiff_log.removeHandler(errors)
        tiff_log.propagate = propagate


def read_tiff(source: str | os.PathLike | bytes, what: str | os.PathLike | None = None) -> np.ndarray:
    """Decode a whole TIFF (a file or its bytes, e.g. a zip member) as stored: any dtype, any ndim.

    Unlike :func:`read_volume` nothing about shape or dtype is required; a damaged file is still
    refused, including the truncated pages and bad offsets tifffile only logs.

    Args:
        source: a path, or the file's bytes.
        what: the name to put in messages (default: the path, or ``"TIFF"``).

    Returns:
        The first series as a numpy array.

    Raises:
        MissingCodecError: a compression whose codec is not installed (LZW without ``imagecodecs``).
        DataError: "corrupt TIFF" (not a TIFF, truncated or damaged, or no image pages), naming it.
    """
    import tifffile

    name = str(what if what is not None else (source if not isinstance(source, bytes) else "TIFF"))
    with _corrupt_tiff_is_a_data_error(name):
        with tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source) as tif:
            if len(tif.pages) == 0 or not tif.series:
                raise ValueError("no image pages")
            problem = tiff_codec_problem(tif, name)
            if problem is not None:
                raise MissingCodecError(problem)
            vol = tif.asarray()
    return vol


def read_tiff_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of the first series of a TIFF from its headers only (no pixel decoding).

    Raises:
        DataError: missing or unreadable file, naming it.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(int(s) for s in tif.series[0].shape)
    except Exception as exc:
        raise DataError(f"{path}: cannot read TIFF header ({type(exc).__name__}: {exc})") from None


def check_tiff_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """Check a volume TIFF from its headers only and return its ``(Z, Y, X)`` shape (no pixel decoding).

    Reads every page's header and checks that each page's pixel data lies inside the file, so a
    truncated or damaged file is found in milliseconds instead of by a full decode: what
    :func:`read_volume` would refuse, short of a bad compressed stream inside an intact layout.

    Raises:
        MissingCodecError: a compression whose codec is not installed (LZW without ``imagecodecs``).
        DataError: missing or empty file, "corrupt TIFF, truncated or damaged", not 3D, not ``uint8``;
            one line naming the file.
    """
    import tifffile

    path = Path(path)
    _check_is_file(path)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes), expected a TIFF volume")
    with _corrupt_tiff_is_a_data_error(path):
        with tifffile.TiffFile(path) as tif:
            problem = tiff_codec_problem(tif, path) if len(tif.pages) else None
            if problem is not None:
                raise MissingCodecError(problem)
            n_pages = 0
            for page in tif.pages:  # each IFD parsed: a cut file fails here ("corrupted IFD structure")
                n_pages += 1
                ends = [o + b for o, b in zip(page.dataoffsets, page.databytecounts)]
                if ends and max(ends) > size:
                    raise ValueError(f"page {n_pages - 1} data ends at byte {max(ends)}, the file has {size}")
            if n_pages == 0 or not tif.series:
                raise ValueError("no image pages")
            shape, dtype = tuple(int(n) for n in tif.series[0].shape), tif.series[0].dtype
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume (z, y, x), got {len(shape)}D array of shape {shape}")
    if dtype != np.uint8:
        raise DataError(f"{path}: expected dtype uint8, got {dtype}")
    return shape  # type: ignore[return-value]


def mask_shape(image_path: str | os.PathLike) -> tuple[int, int, int]:
    """The ``(Z, Y, X)`` shape a submitted mask of this test image must have, from headers only.

    A 3D image gives its own shape. Any other image (e.g. a 4D ``(Z, Y, X, C)`` TIFF) gives what the
    competition's scorer reads from it page by page: ``(pages, page height, page width)``.

    Raises:
        DataError: unreadable TIFF header, naming the file.
    """
    import tifffile

    try:
        with tifffile.TiffFile(image_path) as tif:
            shape = tuple(int(s) for s in tif.series[0].shape)
            if len(shape) == 3:
                return shape  # type: ignore[return-value]
            page = tif.pages[0]
            return (len(tif.pages), int(page.imagelength), int(page.imagewidth))
    except Exception as exc:
        raise DataError(f"{image_path}: cannot read TIFF header ({type(exc).__name__}: {exc})") from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class atomic_path:
    """Context manager yielding a temporary path beside ``path``; renamed onto it on success.

    A killed or failing write leaves no half-written file at ``path`` (the previous file stays); a write
    that ran out of space raises :class:`~kaggle_utils.outputs.DiskFullError` ("disk full: ...")::

        with atomic_path("sub.zip") as tmp:
            write_zip(tmp)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
            )
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, exc) from None
            raise
        os.close(fd)
        os.chmod(name, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual mode
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is None:
            try:
                os.replace(self.tmp, self.path)
            except OSError as err:
                self.tmp.unlink(missing_ok=True)
                if is_disk_full(err):
                    raise disk_full_error(self.path, err) from None
                raise
        else:
            self.tmp.unlink(missing_ok=True)  # the previous file at ``path`` is untouched
            if exc is not None and is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise disk_full_error(self.path, exc) from None  # not torch's "unexpected pos ..."


def write_volume(path: str | os.PathLike, volume: np.ndarray, compression: str | None = "lzw") -> Path:
    """Write a ``uint8 (Z, Y, X)`` volume as a multi-page TIFF, atomically.

    Args:
        path: destination ``.tif``.
        volume: ``uint8 (Z, Y, X)`` array.
        compression: tifffile compression: ``"lzw"`` as the competition files (needs
            ``imagecodecs``), ``"zlib"`` (Python's zlib, no extra package) or ``None``.

    Raises:
        MissingCodecError: ``compression`` needs a codec that is not installed.
        DataError: not 3D or not ``uint8``.
    """
    import tifffile

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(f"{path}: refusing to write a {volume.ndim}D array, expected (z, y, x)")
    if volume.dtype != np.uint8:
        raise DataError(f"{path}: refusing to write dtype {volume.dtype}, expected uint8")
    if compression is not None:
        try:
            name = str(compression).upper()
            code = int(tifffile.COMPRESSION["ADOBE_DEFLATE" if name == "ZLIB" else name])
            encodable = code in tifffile.TIFF.COMPRESSORS
        except Exception:  # a name or value tifffile maps itself: let imwrite decide
            code, encodable = -1, True
        if not encodable:
            raise MissingCodecError(_codec_message(str(path), code, "encode")
                                    + "; or write with compression='zlib' (no extra package)")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, volume, compression=compression, photometric="minisblack")
    return Path(path)


#: Public names that moved out of this module (:func:`kaggle_utils.moved.moved_name_error`).
MOVED = {"write_probs": "kaggle_utils.probs"}


def __getattr__(name: str) -> object:
    """A one-line ``AttributeError`` naming the new home of a name in :data:`MOVED`."""
    from .moved import moved_name_error

    raise moved_name_error(__name__, name, MOVED)


# ----------------------------------------------------------------------------------------------
# Dataset index
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeRecord:
    """One row of ``train.csv``/``test.csv`` with its files."""

    id: str
    scroll_id: str
    image_path: Path
    label_path: Path | None = None


@dataclass
class DatasetIndex:
    """The volumes of one split (``train`` or ``test``) of a competition-layout folder."""

    root: Path
    split: str
    records: list[VolumeRecord]
    skipped: list[str] = field(default_factory=list)  # ids listed but deprecated (no file)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[VolumeRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> VolumeRecord:
        return self.records[i]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def scroll_ids(self) -> list[str]:
        return sorted({r.scroll_id for r in self.records})

    def by_id(self, volume_id: str) -> VolumeRecord:
        for r in self.records:
            if r.id == volume_id:
                return r
        raise KeyError(f"id {volume_id!r} not in {self.root / (self.split + '.csv')}")

    def subset(self, ids: Sequence[str]) -> "DatasetIndex":
        wanted = set(ids)
        return DatasetIndex(self.root, self.split, [r for r in self.records if r.id in wanted])


_KAGGLE_CANDIDATES = (
    f"/kaggle/input/{KAGGLE_SLUG}",
    f"/kaggle/input/competitions/{KAGGLE_SLUG}",
)


def find_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Locate the competition folder.

    Order: ``explicit`` if given; the Kaggle mounts ``/kaggle/input/<slug>`` and
    ``/kaggle/input/competitions/<slug>``; any ``/kaggle/input/**/test.csv`` beside a
    ``test_images`` folder.
    """
    if explicit is not None:
        root = Path(explicit)
        if not root.is_dir():
            raise DataError(f"{root}: data directory not found")
        return root
    for cand in _KAGGLE_CANDIDATES:
        if Path(cand, "test.csv").is_file():
            return Path(cand)
    for csv_path in sorted(glob.glob("/kaggle/input/**/test.csv", recursive=True)):
        if Path(csv_path).with_name("test_images").is_dir():
            return Path(csv_path).parent
    raise DataError(
        "competition data not found: pass --data-dir, or attach the competition to the notebook "
        f"(looked in {', '.join(_KAGGLE_CANDIDATES)} and /kaggle/input/**/test.csv)"
    )


def _read_csv(csv_path: Path) -> list[dict[str, str]]:
    """Rows of ``train.csv``/``test.csv`` as ``{column: value}``, stripped; a UTF-8 byte-order mark and
    CRLF line ends (a CSV saved by Excel) are read like plain UTF-8 with LF."""
    if not csv_path.exists():
        raise DataError(f"{csv_path}: CSV file not found")
    if csv_path.is_dir():
        raise DataError(f"{csv_path}: is a directory, expected a CSV file")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # "-sig": drops Excel's BOM, else "\ufeffid"
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as CSV UTF-8") from None
    with io.StringIO(text, newline="") as fh:  # the csv module handles \r\n, \n and \r line ends itself
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"{csv_path}: empty CSV (no header), expected columns id,scroll_id")
        fields = [f.strip() for f in reader.fieldnames]
        if "id" not in fields:
            raise DataError(f"{csv_path}: no 'id' column (columns: {fields})")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise DataError(f"{csv_path}: CSV has a header but no rows")
    seen: set[str] = set()
    for i, row in enumerate(rows, start=2):
        if not row.get("id"):
            raise DataError(f"{csv_path}: line {i} has an empty id")
        if row["id"] in seen:
            raise DataError(f"{csv_path}: id {row['id']!r} listed twice (line {i})")
        seen.add(row["id"])
    return rows


def load_index(root: str | os.PathLike, split: str = "train", check_files: bool = True) -> DatasetIndex:
    """Build the index of one split of a competition-layout folder.

    Layout: ``{split}.csv`` (columns ``id,scroll_id``), ``{split}_images/{id}.tif`` and, for
    ``train``, ``train_labels/{id}.tif``. Train ids whose image lives only under a
    ``deprecated_train_*`` folder are left out and listed in ``index.skipped``.

    Raises:
        DataError: missing/empty CSV, an id without its image or label file, an image without
            an id, a directory where a file should be.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found")
    csv_path = root / f"{split}.csv"
    rows = _read_csv(csv_path)
    img_dir = root / f"{split}_images"
    lbl_dir = root / "train_labels" if split == "train" else None
    if check_files and not img_dir.is_dir():
        raise DataError(f"{img_dir}: image folder not found (listed by {csv_path})")
    deprecated = {p.stem for p in root.glob(f"deprecated_{split}_*/*.tif")}
    records: list[VolumeRecord] = []
    skipped: list[str] = []
    missing: list[str] = []
    for row in rows:
        vid = row["id"]
        image_path = img_dir / f"{vid}.tif"
        label_path = lbl_dir / f"{vid}.tif" if lbl_dir is not None else None
        if check_files:
            if not image_path.exists():
                if vid in deprecated:
                    skipped.append(vid)
                    continue
                missing.append(str(image_path))
                continue
            if image_path.is_dir():
                raise DataError(f"{image_path}: is a directory, expected a TIFF file")
            if label_path is not None:
                if not label_path.exists():
                    raise DataError(f"{label_path}: label file not found for id {vid!r} of {csv_path}")
                if label_path.is_dir():
                    raise DataError(f"{label_path}: is a directory, expected a TIFF file")
        records.append(VolumeRecord(vid, row.get("scroll_id", ""), image_path, label_path))
    if missing:
        raise DataError(
            f"{csv_path}: {len(missing)} id(s) without an image file, e.g. {missing[:3]}"
        )
    if check_files:
        listed = {r.id for r in records} | set(skipped)
        orphans = sorted(p.name for p in img_dir.glob("*.tif") if p.stem not in listed)
        if orphans:
            raise DataError(
                f"{img_dir}: {len(orphans)} file(s) without an id in {csv_path.name}, e.g. {orphans[:3]}"
            )
    return DatasetIndex(root, split, records, skipped)


# ----------------------------------------------------------------------------------------------
# Folds
# ----------------------------------------------------------------------------------------------


def make_folds(index: DatasetIndex, n_folds: int = 5) -> dict[str, int]:
    """Assign every volume a fold, grouped by ``scroll_id`` (a scroll is in exactly one fold).

    Deterministic: scrolls are taken largest first (ties by scroll id) and each goes to the fold
    holding the fewest volumes so far (ties by fold number).

    Returns:
        ``{volume_id: fold}`` with folds ``0 .. n_folds-1``.
    """
    counts: dict[str, int] = {}
    for r in index:
        counts[r.scroll_id] = counts.get(r.scroll_id, 0) + 1
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(counts) < n_folds:
        raise DataError(
            f"{index.root / (index.split + '.csv')}: {len(counts)} scroll_id(s) {sorted(counts)} "
            f"cannot make {n_folds} scroll-grouped folds; use n_folds <= {len(counts)}"
        )
    sizes = [0] * n_folds
    scroll_fold: dict[str, int] = {}
    for scroll in sorted(counts, key=lambda s: (-counts[s], s)):
        fold = min(range(n_folds), key=lambda f: (sizes[f], f))
        scroll_fold[scroll] = fold
        sizes[fold] += counts[scroll]
    return {r.id: scroll_fold[r.scroll_id] for r in index}


def split_fold(index: DatasetIndex, fold: int, n_folds: int = 5) -> tuple[DatasetIndex, DatasetIndex]:
    """Return ``(train_index, val_index)`` for ``fold`` of :func:`make_folds`."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    folds = make_folds(index, n_folds)
    train = [r.id for r in index if folds[r.id] != fold]
    val = [r.id for r in index if folds[r.id] == fold]
    return index.subset(train), index.subset(val)


# ----------------------------------------------------------------------------------------------
# Intensity normalization (the one function shared by training and inference)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntensityStats:
    """Per-volume intensity statistics: clip window ``[lo, hi]`` and ``mean``/``std`` inside it."""

    lo: float
    hi: float
    mean: float
    std: float


def intensity_stats(volume: np.ndarray, clip_percentiles: tuple[float, float] = (0.5, 99.5)) -> IntensityStats:
    """Statistics of a ``uint8 (Z, Y, X)`` volume from its 256-bin histogram (exact, one pass).

    The clip window is the given percentiles; mean and std are those of the clipped volume.
    """
    volume = np.asarray(volume)
    if volume.dtype != np.uint8:
        raise DataError(f"intensity_stats expects a uint8 volume, got {volume.dtype}")
    hist = np.bincount(volume.ravel(), minlength=256).astype(np.float64)
    cdf = np.cumsum(hist) / max(hist.sum(), 1.0)
    lo = float(np.searchsorted(cdf, clip_percentiles[0] / 100.0))
    hi = float(np.searchsorted(cdf, clip_percentiles[1] / 100.0))
    values = np.clip(np.arange(256, dtype=np.float64), lo, hi)
    n = max(hist.sum(), 1.0)
    mean = float((hist * values).sum() / n)
    std = float(np.sqrt(max((hist * (values - mean) ** 2).sum() / n, 0.0)))
    return IntensityStats(lo, hi, mean, max(std, 1e-3))


def normalize_intensity(
    volume: np.ndarray,
    stats: IntensityStats | None = None,
    mode: str = "zscore",
) -> np.ndarray:
    """Map raw ``uint8`` CT intensities to the network's input range. Used by training AND inference.

    Args:
        volume: ``uint8`` array of any shape (a whole volume or a patch of it).
        stats: statistics of the *whole* volume the array comes from (so a patch is normalized
            exactly as the same voxels are at inference); computed from ``volume`` when ``None``.
        mode: ``"zscore"`` (default; clip to the volume's 0.5-99.5 percentiles, subtract mean,
            divide by std: robust to the per-scroll brightness differences) or ``"fixed"``
            (``x / 127.5 - 1``, no statistics).

    Returns:
        ``float32`` array of the same shape.
    """
    volume = np.asarray(volume)
    if mode == "fixed":
        return volume.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if mode != "zscore":
        raise ValueError(f"normalization mode must be 'zscore' or 'fixed', got {mode!r}")
    if stats is None:
        stats = intensity_stats(volume)
    out = np.clip(volume.astype(np.float32), stats.lo, stats.hi)
    out -= np.float32(stats.mean)
    out /= np.float32(stats.std)
    return out


# ----------------------------------------------------------------------------------------------
# Checking a dataset
# ----------------------------------------------------------------------------------------------


def label_shares(label: np.ndarray) -> tuple[float, float, float]:
    """Shares of label values 0, 1, 2 in a ``uint8`` label volume."""
    counts = np.bincount(np.asarray(label).ravel(), minlength=3)[:3].astype(np.float64)
    total = max(float(label.size), 1.0)
    return tuple(float(c / total) for c in counts)  # type: ignore[return-value]


def check_data(root: str | os.PathLike, splits: Sequence[str] = ("train", "test"), progress: bool = True) -> list[dict]:
    """Validate a competition-layout folder volume by volume.

    Returns one dict per volume: ``split, id, scroll_id, shape, dtype, share0, share1, share2,
    problems`` (a list of messages; empty when the volume is fine). Problems with the CSVs or the
    file lists raise :class:`DataError`. ``progress``: a bar per split (only where someone watches).
    """
    from .progress import progress_bar

    rows: list[dict] = []
    for split in splits:
        if split == "test" and not (Path(root) / "test.csv").exists():
            continue
        index = load_index(root, split)
        for rec in progress_bar(index.records, enabled=progress, desc=f"check {split}", unit="vol", leave=False):
            row: dict = {
                "split": split, "id": rec.id, "scroll_id": rec.scroll_id,
                "shape": None, "dtype": None, "share0": None, "share1": None, "share2": None,
                "problems": [],
            }
            try:
                image = read_volume(rec.image_path)
                row["shape"], row["dtype"] = tuple(image.shape), str(image.dtype)
            except DataError as exc:
                row["problems"].append(str(exc))
                image = None
            if rec.label_path is not None:
                try:
                    label = read_label(rec.label_path)
                    row["share0"], row["share1"], row["share2"] = label_shares(label)
                    if image is not None and label.shape != image.shape:
                        row["problems"].append(
                            f"{rec.label_path}: label shape {tuple(label.shape)} != image shape "
                            f"{tuple(image.shape)} ({rec.image_path.name})"
                        )
                except DataError as exc:
                    row["problems"].append(str(exc))
            rows.append(row)
    return rows
