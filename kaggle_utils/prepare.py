"""Decode once: the competition's LZW TIFFs as a memory-mapped cache (``python -m kaggle_utils prepare``).

``python -m kaggle_utils prepare --data-dir COMP --out CACHE [--labels npy|packed|none] [--ids ...]
[--folds K ...] [--part K/N] [--workers N]`` decodes every training volume of ``COMP`` (``train.csv``,
``train_images/``, ``train_labels/``) once into ``CACHE``; training then reads patches from
memory-mapped arrays (``sampler.prepared: CACHE`` or ``train --prepared CACHE``): no rank and no
DataLoader worker decodes a TIFF, and the OS page cache, shared by all of them, holds what is hot.

Layout of ``CACHE`` (stable; :data:`FORMAT` / :data:`VERSION` in ``manifest.json``)::

    manifest.json              {"format", "version", "labels", "images", "surface_points", "volumes": {id: entry}}
    volumes/{id}.image.npy     uint8 (Z, Y, X), the decoded image                 (images: npy)
    volumes/{id}.image.b2nd    the same, a blosc2 NDArray (zstd level 1, chunks 64^3) (images: blosc2)
    volumes/{id}.label.npy     uint8 (Z, Y, X) in {0, 1, 2}               (labels: npy)
    volumes/{id}.label2b.npy   uint8 (Z, Y, ceil(X/4)): four 2-bit labels per byte, x = 4k + j in
                               bits 2j..2j+1 (labels: packed, a quarter of the disk)
    volumes/{id}.label.b2nd    uint8 (Z, Y, X) as a blosc2 NDArray (zstd level 1 + bit shuffle,
                               chunks 64^3): ~1/60 of the disk on label volumes (labels: blosc2)
    volumes/{id}.surface.npy   int32 (N, 3) z, y, x of label-1 voxels: the sampler's surface index,
                               the same deterministic subsample of ``surface_points`` that
                               :class:`~kaggle_utils.sampling.VolumeCache` draws from the TIFFs
    volumes/{id}.json          the volume's manifest entry, written last: the volume is done

blosc2 files (``--images blosc2``, ``--labels blosc2``; the ``blosc2`` package, which Kaggle's image
has) are read a patch at a time: only the 64^3 chunks a patch touches are decompressed, one thread
per DataLoader worker (BENCHMARKS.md, "The prepared cache: .npy or blosc2").

A manifest entry: ``id, scroll_id, shape, label_shares [bg, surface, ignore], stats [lo, hi, mean,
std]`` (:class:`~kaggle_utils.data.IntensityStats` of the whole image), ``n_surface`` (label-1
voxels), ``surface_points``, ``labels``, ``images`` (absent in caches made before it: npy) and
``source: {image: [size, crc], label: [size, crc]}``: the
TIFFs' byte sizes and a CRC-32 of their first and last 64 KiB (not mtimes: a copy of the data, as in
another Kaggle session, keeps them). :func:`open_prepared` checks the ids a run uses against the data
folder by that fingerprint.

Guarantees: each file is written atomically (``data.atomic_path``) and the volume's ``.json`` last,
so a killed run leaves no half file and a rerun redoes only unfinished volumes (``manifest.json`` is
rewritten at the end from every finished volume in the folder, so subsets prepared in several calls
add up). Each volume is checked against its source once: both TIFFs decode, same shape, label values
in {0, 1, 2} (a corrupt file stops the run with one line naming it).

Public API: :func:`prepare` (-> :class:`PrepareReport`), :func:`select_ids`, :func:`open_prepared`
(-> :class:`PreparedVolumes`, what the sampler and validation read), :func:`find_prepared` (the caches
under ``/kaggle/input``; the train notebook's ``PREPARED = "auto"``), :func:`pack_labels` /
:func:`unpack_labels` / :class:`PackedLabel`, :class:`Blosc2Volume`, :func:`source_fingerprint`,
:class:`PreparedCacheError`.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .data import (
    DataError,
    DatasetIndex,
    IntensityStats,
    VolumeRecord,
    atomic_path,
    intensity_stats,
    load_index,
    make_folds,
    read_label,
    read_volume,
)

__all__ = [
    "CachedVolume",
    "surface_subsample",
    "FORMAT",
    "VERSION",
    "LABEL_STORAGE",
    "PreparedCacheError",
    "PrepareReport",
    "PackedLabel",
    "Blosc2Volume",
    "IMAGE_STORAGE",
    "PreparedVolumes",
    "pack_labels",
    "unpack_labels",
    "source_fingerprint",
    "select_ids",
    "prepare",
    "prepare_volume",
    "read_manifest",
    "open_prepared",
    "find_prepared",
]


@dataclass
class CachedVolume:
    """A decoded training volume with what sampling needs from it (what :class:`PreparedVolumes` and
    :class:`kaggle_utils.sampling.VolumeCache` both hand out).

    Attributes:
        image: ``uint8 (Z, Y, X)`` (an ``np.memmap`` when disk-cached).
        label: ``uint8 (Z, Y, X)`` values {0, 1, 2}.
        stats: whole-volume :class:`~kaggle_utils.data.IntensityStats` (for patch normalization).
        surface: ``int32 (N, 3)`` z, y, x of surface voxels (a subsample; ``N`` may be 0).
    """

    image: np.ndarray
    label: np.ndarray
    stats: IntensityStats
    surface: np.ndarray

    @property
    def nbytes(self) -> int:
        """Resident bytes counted by the cache (memory-mapped arrays count as 0)."""
        n = self.surface.nbytes
        for arr in (self.image, self.label):
            if not isinstance(arr, np.memmap):
                n += arr.nbytes
        return n


def surface_subsample(label: np.ndarray, key: str, max_points: int) -> np.ndarray:
    """``int32 (N, 3)`` coordinates of label-1 voxels, at most ``max_points`` (seeded by ``key``)."""
    flat = np.flatnonzero(label.reshape(-1) == 1)
    if flat.size > max_points:
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        flat = np.sort(rng.choice(flat, size=max_points, replace=False))
    return np.stack(np.unravel_index(flat, label.shape), axis=1).astype(np.int32)


FORMAT = "kaggle_utils.prepared"
VERSION = 1
LABEL_STORAGE = ("npy", "packed", "blosc2", "none")
IMAGE_STORAGE = ("npy", "blosc2")
#: blosc2 settings per kind: codec level, filter, chunk and block edge (benchmarks/blosc2_cache.py:
#: zstd-1 with bit shuffle packs labels best; shuffle, a no-op on bytes, leaves images to zstd)
_BLOSC2 = {"image": (1, "SHUFFLE", 64, 32), "label": (1, "BITSHUFFLE", 64, 32)}
_FINGERPRINT_BYTES = 64 * 1024


class PreparedCacheError(DataError):
    """A prepared cache that cannot be used: unfinished, of another format, or made from other data."""


# ----------------------------------------------------------------------------------------------
# Labels packed four to a byte
# ----------------------------------------------------------------------------------------------


def pack_labels(label: np.ndarray) -> np.ndarray:
    """Pack ``uint8 (Z, Y, X)`` labels in {0..3} into ``uint8 (Z, Y, ceil(X/4))``: x = 4k + j in bits 2j, 2j+1."""
    label = np.asarray(label, dtype=np.uint8)
    z, y, x = label.shape
    pad = (-x) % 4
    if pad:
        label = np.concatenate([label, np.zeros((z, y, pad), np.uint8)], axis=2)
    q = label.reshape(z, y, -1, 4)
    return (q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)).astype(np.uint8)


def unpack_labels(packed: np.ndarray, x_size: int, x_start: int = 0, x_stop: int | None = None) -> np.ndarray:
    """Labels ``uint8 (Z', Y', x_stop - x_start)`` of columns ``x_start:x_stop`` from packed rows ``(Z', Y', ceil(X/4))``."""
    x_stop = x_size if x_stop is None else x_stop
    if x_stop <= x_start:
        return np.zeros(packed.shape[:2] + (0,), np.uint8)
    k0, k1 = x_start // 4, (x_stop + 3) // 4
    block = np.asarray(packed[..., k0:k1])
    out = (block[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & np.uint8(3)
    out = out.reshape(block.shape[:2] + (-1,))
    return out[..., x_start - 4 * k0: x_stop - 4 * k0]


class _SlicedVolume:
    """What :class:`PackedLabel` and :class:`Blosc2Volume` share: a read-only volume read through
    ``vol[z0:z1, y0:y1, x0:x1]`` (the subclass's ``__getitem__``, which also takes ``...``), with
    ``.shape``, ``.size`` and ``np.asarray(vol)`` (the whole volume)."""

    memory_mapped = True
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key: Any) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class PackedLabel(_SlicedVolume):
    """A read-only ``uint8 (Z, Y, X)`` label volume stored packed (:func:`pack_labels`), usually memory-mapped.

    Supports what the sampler and validation do with a label array: ``.shape``, ``.dtype``, ``.ndim``,
    ``label[z0:z1, y0:y1, x0:x1]`` (unit-step slices; only the needed bytes are unpacked) and
    ``np.asarray(label)`` (the whole volume).
    """

    def __init__(self, packed: np.ndarray, shape: Sequence[int]):
        self.packed = packed
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        if key is Ellipsis:
            key = (slice(None),) * 3
        if not isinstance(key, tuple) or len(key) != 3 or not all(isinstance(k, slice) for k in key):
            raise TypeError("PackedLabel supports only [z0:z1, y0:y1, x0:x1] slicing")
        if any(k.step not in (None, 1) for k in key):
            raise TypeError("PackedLabel supports only unit-step slices")
        x0, x1, _ = key[2].indices(self.shape[2])
        return unpack_labels(self.packed[key[0], key[1]], self.shape[2], x0, max(x0, x1))


# ----------------------------------------------------------------------------------------------
# blosc2 arrays
# ----------------------------------------------------------------------------------------------


def _blosc2(path: Path) -> Any:
    """The ``blosc2`` module, or :class:`PreparedCacheError` saying how to get it."""
    try:
        import blosc2
    except ImportError:
        raise PreparedCacheError(f"{path}: blosc2 storage needs the blosc2 package, which is not installed: "
                                 "pip install blosc2 (Kaggle's image has it)") from None
    return blosc2


def _save_blosc2(path: Path, arr: np.ndarray, kind: str) -> None:
    """Write ``arr`` as a blosc2 NDArray file, atomically (settings :data:`_BLOSC2` of ``kind``)."""
    blosc2 = _blosc2(path)
    clevel, filt, chunk, block = _BLOSC2[kind]
    cparams = {"codec": blosc2.Codec.ZSTD, "clevel": clevel, "filters": [getattr(blosc2.Filter, filt)],
               "nthreads": 1}  # a dict, not CParams: blosc2 2.x reads it too
    with atomic_path(path) as tmp:
        blosc2.asarray(np.ascontiguousarray(arr), urlpath=str(tmp), mode="w", chunks=(chunk,) * 3,
                       blocks=(block,) * 3, cparams=cparams)


class Blosc2Volume(_SlicedVolume):
    """A read-only ``uint8 (Z, Y, X)`` volume in a blosc2 file, read a slice at a time.

    Supports what the sampler and validation do with an image or a label array: ``.shape``,
    ``.dtype``, ``.ndim``, ``vol[z0:z1, y0:y1, x0:x1]`` (decompresses only the chunks it touches, one
    thread) and ``np.asarray(vol)``. The file is opened on first read in each process (DataLoader
    workers fork after the volume was handed out). A damaged file raises :class:`PreparedCacheError`
    naming it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._nd: Any = None
        self._pid = -1
        nd = self._array()
        self.shape = tuple(int(s) for s in nd.shape)
        self.dtype = np.dtype(nd.dtype)
        self.ndim = len(self.shape)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_nd": None, "_pid": -1}

    def _damaged(self, exc: Exception) -> PreparedCacheError:
        return PreparedCacheError(f"{self.path}: unreadable blosc2 array ({type(exc).__name__}: {exc}); delete the "
                                  f"volume's .json beside it and rerun prepare to redo it")

    def _array(self) -> Any:
        if self._nd is None or self._pid != os.getpid():
            blosc2 = _blosc2(self.path)
            try:
                self._nd = blosc2.open(str(self.path), mode="r", dparams={"nthreads": 1})
            except (OSError, RuntimeError, ValueError) as exc:
                raise self._damaged(exc) from None
            self._pid = os.getpid()
        return self._nd

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self._array()[key])
        except (RuntimeError, ValueError) as exc:
            raise self._damaged(exc) from None


# ----------------------------------------------------------------------------------------------
# Preparing
# ----------------------------------------------------------------------------------------------


def source_fingerprint(path: str | os.PathLike) -> list[int]:
    """``[size in bytes, CRC-32 of the first and last 64 KiB]`` of a file (cheap; independent of mtime)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(_FINGERPRINT_BYTES)
        fh.seek(max(0, size - _FINGERPRINT_BYTES))
        tail = fh.read(_FINGERPRINT_BYTES)
    return [int(size), int(zlib.crc32(tail, zlib.crc32(head)))]


def select_ids(index: DatasetIndex, ids: Sequence[str] | None = None, folds: Sequence[int] | None = None,
               n_folds: int = 5, part: tuple[int, int] | None = None) -> list[str]:
    """The ids of ``index`` to prepare, in ``train.csv`` order: all, or those listed in ``ids``, in the
    scroll-grouped ``folds`` of ``data.make_folds(index, n_folds)`` and in part ``k`` of ``n``
    (``part=(k, n)``, 1-based: every n-th id of the selection, for caches split over several datasets).

    Raises:
        DataError: an id not in the index, a fold outside ``0..n_folds-1``, or a bad part.
    """
    chosen = index.ids
    if ids is not None:
        unknown = sorted(set(ids) - set(chosen))
        if unknown:
            raise DataError(f"{index.root / 'train.csv'}: --ids {unknown[:5]} not listed (or without files)")
        wanted = set(ids)
        chosen = [i for i in chosen if i in wanted]
    if folds is not None:
        bad = [f for f in folds if not 0 <= int(f) < n_folds]
        if bad:
            raise DataError(f"--folds {bad}: not folds of --n-folds {n_folds} (0..{n_folds - 1})")
        fold_of = make_folds(index, n_folds)
        chosen = [i for i in chosen if fold_of[i] in set(int(f) for f in folds)]
    if part is not None:
        k, n = part
        if not 1 <= k <= n:
            raise DataError(f"--part {k}/{n}: K must be in 1..N")
        chosen = chosen[k - 1::n]
    return chosen


def _volume_paths(out: Path, vid: str, labels: str, images: str = "npy") -> dict[str, Path]:
    base = out / "volumes"
    paths = {"image": base / f"{vid}.image.{'b2nd' if images == 'blosc2' else 'npy'}",
             "surface": base / f"{vid}.surface.npy", "entry": base / f"{vid}.json"}
    suffix = {"npy": "label.npy", "packed": "label2b.npy", "blosc2": "label.b2nd"}.get(labels)
    if suffix is not None:
        paths["label"] = base / f"{vid}.{suffix}"
    return paths


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr))


def _decode_checked(rec: VolumeRecord) -> tuple[np.ndarray, np.ndarray]:
    """Image and label of ``rec`` decoded and checked (both readable, labels in {0, 1, 2}, same shape)."""
    if rec.label_path is None:
        raise DataError(f"{rec.image_path}: id {rec.id!r} has no label file")
    image = read_volume(rec.image_path)
    label = read_label(rec.label_path)
    if image.shape != label.shape:
        raise DataError(f"{rec.label_path}: label shape {tuple(label.shape)} != image shape "
                        f"{tuple(image.shape)} ({rec.image_path.name})")
    return image, label


def prepare_volume(rec: VolumeRecord, out: str | os.PathLike, labels: str = "npy",
                   surface_points: int = 50_000, images: str = "npy") -> dict:
    """Decode, check and write one volume into the cache ``out`` (see the module doc); its manifest entry.

    Raises:
        DataError: a corrupt or missing TIFF, label values outside {0, 1, 2}, or shapes that differ
            (one line naming the file).
    """

    out = Path(out)
    paths = _volume_paths(out, rec.id, labels, images)
    source = {"image": source_fingerprint(rec.image_path), "label": source_fingerprint(rec.label_path)}
    image, label = _decode_checked(rec)
    surface = surface_subsample(label, rec.id, surface_points)
    stats = intensity_stats(image)
    counts = [int(np.count_nonzero(label == v)) for v in (0, 1, 2)]  # faster than a bincount of the volume
    entry = {"id": rec.id, "scroll_id": rec.scroll_id, "shape": list(image.shape),
             "label_shares": [round(c / max(label.size, 1), 6) for c in counts],
             "stats": [stats.lo, stats.hi, stats.mean, stats.std], "n_surface": counts[1],
             "surface_points": int(surface_points), "labels": labels, "images": images, "source": source,
             "files": {k: p.name for k, p in paths.items() if k != "entry"}}
    if images == "blosc2":
        _save_blosc2(paths["image"], image, "image")
    else:
        _save_npy(paths["image"], image)
    if labels == "npy":
        _save_npy(paths["label"], label)
    elif labels == "packed":
        _save_npy(paths["label"], pack_labels(label))
    elif labels == "blosc2":
        _save_blosc2(paths["label"], label, "label")
    _save_npy(paths["surface"], surface)
    with atomic_path(paths["entry"]) as tmp:  # last: the volume is done
        Path(tmp).write_text(json.dumps(entry, indent=1))
    return entry


def _settings(entry: dict) -> tuple:
    """``(labels, surface_points, images)`` of a manifest or an entry (``images`` absent: npy)."""
    return entry.get("labels"), entry.get("surface_points"), entry.get("images", "npy")


def _done_entry(rec: VolumeRecord, out: Path, labels: str, surface_points: int, images: str = "npy") -> dict | None:
    """The entry of an already prepared volume that still matches its source and settings, else ``None``."""
    paths = _volume_paths(out, rec.id, labels, images)
    try:
        entry = json.loads(paths["entry"].read_text())
    except (OSError, ValueError):
        return None
    if _settings(entry) != (labels, surface_points, images):
        return None
    if not all(p.is_file() for p in paths.values()):
        return None
    try:
        fresh = {"image": source_fingerprint(rec.image_path), "label": source_fingerprint(rec.label_path)}
    except OSError:
        return None
    return entry if entry.get("source") == fresh else None


def _remove_temp_files(folder: Path) -> int:
    """Remove the temp files of an earlier, killed run (``.{name}.*.tmp`` of ``atomic_path``)."""
    n = 0
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def _write_manifest(out: Path, labels: str, surface_points: int, images: str = "npy") -> dict:
    """``manifest.json`` from every finished volume in ``out/volumes`` (atomic); the manifest."""
    volumes = {}
    for p in sorted((out / "volumes").glob("*.json")):
        entry = json.loads(p.read_text())
        if _settings(entry) == (labels, surface_points, images):
            volumes[entry["id"]] = entry
    manifest = {"format": FORMAT, "version": VERSION, "labels": labels, "images": images,
                "surface_points": surface_points, "volumes": volumes}
    with atomic_path(out / "manifest.json") as tmp:
        Path(tmp).write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass
class PrepareReport:
    """What :func:`prepare` did: ids prepared now, ids skipped (already done), seconds, bytes on disk."""

    out: Path
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    disk_bytes: int = 0
    n_volumes: int = 0

    def __str__(self) -> str:
        return (f"prepared {len(self.prepared)} volume(s) in {self.seconds:.1f} s, {len(self.skipped)} already done; "
                f"{self.out} holds {self.n_volumes} volume(s), {self.disk_bytes / 1e9:.2f} GB")


def _check_settings(out: Path, labels: str, surface_points: int, images: str = "npy") -> None:
    if labels not in LABEL_STORAGE:
        raise ValueError(f"labels: must be one of {list(LABEL_STORAGE)}, got {labels!r}")
    if images not in IMAGE_STORAGE:
        raise ValueError(f"images: must be one of {list(IMAGE_STORAGE)}, got {images!r}")
    if "blosc2" in (labels, images):
        _blosc2(out)  # missing package: say so before decoding anything
    if surface_points < 1:
        raise ValueError(f"surface_points: must be >= 1, got {surface_points}")
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            return
        if _settings(old) != (labels, surface_points, images):
            raise PreparedCacheError(f"{manifest}: prepared with labels {old.get('labels')!r}, images "
                                     f"{old.get('images', 'npy')!r}, surface_points {old.get('surface_points')}; "
                                     f"use the same settings or another --out")


def prepare(data_dir: str | os.PathLike, out: str | os.PathLike, *, ids: Sequence[str] | None = None,
            folds: Sequence[int] | None = None, n_folds: int = 5, part: tuple[int, int] | None = None,
            labels: str = "npy", surface_points: int = 50_000, workers: int = 2,
            progress: bool = True, images: str = "npy") -> PrepareReport:
    """Decode the training volumes of ``data_dir`` (or a subset, :func:`select_ids`) into the cache ``out``.

    Resumable: volumes already prepared from the same source files with the same settings are skipped.

    Args:
        labels: ``npy`` (uint8, as large as the image), ``packed`` (2 bits per voxel), ``blosc2``
            (compressed, ~0.5 MB per 320^3 label volume; needs ``blosc2``) or ``none`` (images and the
            surface index only; training then decodes labels from the TIFFs).
        images: ``npy`` (memory-mapped, fastest to read) or ``blosc2`` (compressed; what it saves
            depends on the scans' noise: 12 % on the synthetic images, unmeasured on real CT).
        surface_points: size of each volume's surface index (``sampler.surface_points``).
        workers: volumes decoded in parallel (threads: LZW decoding releases the GIL).

    Raises:
        DataError: a corrupt source volume (naming the file), an unknown id, bad folds.
        PreparedCacheError: ``out`` was prepared with other ``labels``/``images``/``surface_points``,
            or blosc2 storage without the ``blosc2`` package.
    """
    from .progress import progress_bar

    t0 = time.monotonic()
    out = Path(out)
    _check_settings(out, labels, surface_points, images)
    index = load_index(data_dir, "train")
    chosen = index.subset(select_ids(index, ids, folds, n_folds, part)).records
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out / "volumes")
    report = PrepareReport(out)
    todo = []
    for rec in chosen:
        (report.skipped.append(rec.id) if _done_entry(rec, out, labels, surface_points, images) else todo.append(rec))
    bar = progress_bar(total=len(todo), desc="prepare", unit="vol", enabled=progress)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for entry in pool.map(lambda r: prepare_volume(r, out, labels, surface_points, images), todo):
            report.prepared.append(entry["id"])
            bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a corrupt volume, start no more
        bar.close()
    manifest = _write_manifest(out, labels, surface_points, images)
    report.n_volumes = len(manifest["volumes"])
    report.disk_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report.seconds = time.monotonic() - t0
    return report


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_manifest(folder: str | os.PathLike) -> dict:
    """The ``manifest.json`` of a prepared cache (its volumes' folder added as ``entry["dir"]``).

    Raises:
        PreparedCacheError: no manifest (not a cache, or ``prepare`` never finished), or another format.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        what = "prepare did not finish; run it again (it resumes)" if (folder / "volumes").is_dir() else \
            "not a prepared cache (python -m kaggle_utils prepare --data-dir DATA --out DIR)"
        raise PreparedCacheError(f"{path}: not found: {what}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise PreparedCacheError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PreparedCacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                                 f"this kaggle_utils reads {FORMAT!r} version {VERSION}: prepare it again")
    for entry in manifest["volumes"].values():
        entry["dir"] = str(folder / "volumes")
    return manifest


def _merged_entries(folders: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """``{id: entry}`` over several caches (e.g. one per attached dataset); the first holding an id wins."""
    entries: dict[str, dict] = {}
    for folder in folders:
        for vid, entry in read_manifest(folder)["volumes"].items():
            entries.setdefault(vid, entry)
    return entries


def _check_against(entries: dict[str, dict], records: Iterable[VolumeRecord], where: str) -> None:
    """Raise :class:`PreparedCacheError` unless every record is in the cache, prepared from the same files."""
    records = list(records)
    missing = [r.id for r in records if r.id not in entries]
    if missing:
        raise PreparedCacheError(f"{where}: {len(missing)} of the run's {len(records)} volume(s) are not prepared, "
                                 f"e.g. {missing[:3]}; prepare them (python -m kaggle_utils prepare --ids ...)")
    for rec in records:
        src = entries[rec.id]["source"]
        for key, path in (("image", rec.image_path), ("label", rec.label_path)):
            if path is not None and source_fingerprint(path) != src[key]:
                raise PreparedCacheError(f"{where}: {rec.id} was prepared from another {path.name} than {path} "
                                         f"(size/CRC differ): the cache does not match the data folder; "
                                         f"prepare it again from this data")


class PreparedVolumes:
    """The volumes of prepared caches, as the sampler's cache: ``get(record) -> CachedVolume`` of memmaps.

    Drop-in for :class:`~kaggle_utils.sampling.VolumeCache` in :class:`~kaggle_utils.sampling.PatchDataset`
    (and what validation reads): images and labels are memory-mapped (``np.load(mmap_mode="r")``),
    packed labels wrapped in :class:`PackedLabel`, blosc2 files in :class:`Blosc2Volume`. Nothing is
    decoded, and nothing counts against a worker's ``cache_bytes`` except labels of a cache without labels (``labels: none``), which are read
    from the TIFFs into an LRU of ``label_cache_bytes``. A ``surface_points`` other than the cache's
    recomputes the (same, deterministic) surface subsample from the label on first use.

    Args:
        folders: one cache or several (the first holding an id wins).
        surface_points: the sampler's ``surface_points``.
        label_cache_bytes: LRU bound for labels decoded from TIFFs (``labels: none`` only).
    """

    def __init__(self, folders: str | os.PathLike | Sequence[str | os.PathLike], surface_points: int = 50_000,
                 label_cache_bytes: int = 2 * 1024**3):
        self.folders = [Path(folders)] if isinstance(folders, (str, os.PathLike)) else [Path(f) for f in folders]
        self.entries = _merged_entries(self.folders)
        self.surface_points = int(surface_points)
        self.label_cache_bytes = int(label_cache_bytes)
        self._open: dict[str, Any] = {}
        self._labels: Any = None  # VolumeCache-like LRU for labels: none
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = {}
        state["_labels"] = None
        return state

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, vid: str) -> bool:
        return vid in self.entries

    @property
    def nbytes(self) -> int:
        return 0 if self._labels is None else sum(a.nbytes for a in self._labels.values())

    def clear(self) -> None:
        self._open.clear()
        self._labels = None

    def check(self, records: Iterable[VolumeRecord]) -> None:
        """Every record prepared, from the same source files (:class:`PreparedCacheError` naming the cache)."""
        _check_against(self.entries, records, ", ".join(str(f) for f in self.folders))

    def shape(self, vid: str) -> tuple[int, int, int]:
        return tuple(self.entries[vid]["shape"])  # type: ignore[return-value]

    def image(self, vid: str) -> Any:
        """``uint8 (Z, Y, X)`` image: a memmap, or a :class:`Blosc2Volume` (``images: blosc2``)."""
        return self._array(self._entry(vid), "image")

    def _array(self, entry: dict, kind: str, mmap: bool = True) -> Any:
        """One of the volume's arrays (memory-mapped, or a :class:`Blosc2Volume`); :class:`PreparedCacheError`
        naming a damaged file."""
        path = Path(entry["dir"]) / entry["files"][kind]
        if path.suffix == ".b2nd":
            arr = Blosc2Volume(path)
        else:
            try:
                arr = np.load(path, mmap_mode="r" if mmap else None)
            except (OSError, ValueError, EOFError) as exc:
                raise PreparedCacheError(f"{path}: unreadable prepared array ({type(exc).__name__}: {exc}); delete "
                                         f"{entry['id']}.json beside it and rerun prepare to redo the volume") from None
        full_size = kind == "image" or (kind == "label" and entry["labels"] in ("npy", "blosc2"))
        expected = entry["shape"] if full_size else None
        if expected is not None and list(arr.shape) != list(expected):
            raise PreparedCacheError(f"{path}: shape {list(arr.shape)} != {list(expected)} in the manifest; delete "
                                     f"{entry['id']}.json beside it and rerun prepare to redo the volume")
        return arr

    def label(self, record: VolumeRecord) -> Any:
        """``uint8 (Z, Y, X)`` labels: a memmap, a :class:`PackedLabel`, a :class:`Blosc2Volume`, or decoded
        from the TIFF (``labels: none``)."""
        entry = self._entry(record.id)
        kind = entry["labels"]
        if kind in ("npy", "blosc2"):
            return self._array(entry, "label")
        if kind == "packed":
            return PackedLabel(self._array(entry, "label"), entry["shape"])
        return self._decoded_label(record)

    def get(self, record: VolumeRecord):
        """The :class:`CachedVolume` of ``record`` (opened on first use)."""

        vol = self._open.get(record.id)
        if vol is not None:
            self.hits += 1
            if self._entry(record.id)["labels"] == "none":
                vol.label = self._decoded_label(record)
            return vol
        self.misses += 1
        entry = self._entry(record.id)
        label = self.label(record)
        if entry["surface_points"] == self.surface_points:
            surface = self._array(entry, "surface", mmap=False)
        else:
            surface = surface_subsample(np.asarray(label), record.id, self.surface_points)
        vol = CachedVolume(self.image(record.id), label, IntensityStats(*entry["stats"]), surface.astype(np.int32))
        self._open[record.id] = vol
        return vol

    def _entry(self, vid: str) -> dict:
        try:
            return self.entries[vid]
        except KeyError:
            raise PreparedCacheError(f"{', '.join(map(str, self.folders))}: volume {vid!r} is not prepared") from None

    def _decoded_label(self, record: VolumeRecord) -> np.ndarray:
        from collections import OrderedDict

        if self._labels is None:
            self._labels = OrderedDict()
        lru = self._labels
        if record.id in lru:
            lru.move_to_end(record.id)
            return lru[record.id]
        if record.label_path is None:
            raise DataError(f"{record.image_path}: id {record.id!r} has no label file; patches need labels")
        lru[record.id] = read_label(record.label_path)
        while len(lru) > 1 and sum(a.nbytes for a in lru.values()) > self.label_cache_bytes:
            lru.popitem(last=False)
        return lru[record.id]


def open_prepared(folders: str | os.PathLike | Sequence[str | os.PathLike], records: Iterable[VolumeRecord] | None = None,
                  surface_points: int = 50_000, label_cache_bytes: int = 2 * 1024**3) -> PreparedVolumes:
    """:class:`PreparedVolumes` over ``folders``, checked against ``records`` (every one prepared, from
    the same TIFFs) when given.

    Raises:
        PreparedCacheError: no finished cache in a folder, another format, or a record missing or
            prepared from other files (one line naming the cache and the volume).
    """
    vols = PreparedVolumes(folders, surface_points, label_cache_bytes)
    if records is not None:
        vols.check(records)
    return vols


def find_prepared(root: str | os.PathLike = "/kaggle/input") -> list[Path]:
    """Every folder under ``root`` holding a finished prepared cache (a ``manifest.json`` of :data:`FORMAT`),
    sorted: the attached datasets of a cache split over several (``prepare --part K/N``)."""
    found = []
    for manifest in sorted(Path(root).glob("**/manifest.json")):
        try:
            with open(manifest) as fh:
                head = fh.read(200)
        except OSError:
            continue
        if f'"format": "{FORMAT}"' in head:
            found.append(manifest.parent)
    return found
