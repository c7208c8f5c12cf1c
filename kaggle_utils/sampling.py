"""3D patch sampling for training (numpy, in DataLoader workers; batch augmentation is :mod:`kaggle_utils.augment`).

Pipeline for one training item ``i`` of epoch ``e`` (all randomness drawn from ``(seed, e, i)``,
never from worker state, so any number of DataLoader workers gives the same patches):

1. pick a volume (uniformly, or a scroll first when ``balance_scrolls``);
2. pick a patch origin: centred on a random surface voxel (share ``surface_share``, with a small
   jitter, clamped to the volume) or uniform; patches with more than ``max_ignore_share`` ignore
   voxels are redrawn (``max_tries`` times, then the least-ignore patch seen is kept);
3. cut the ``uint8`` crop, then normalize *the crop* with the statistics of the *whole* volume via
   :func:`kaggle_utils.data.normalize_intensity` (the function inference uses on whole volumes);
4. optionally augment it with :func:`kaggle_utils.augment.augment_batch` (the same torch function
   that augments whole batches on the GPU).

Volumes are decoded once and kept in a :class:`VolumeCache` (LRU bounded by bytes, optionally
backed by memory-mapped ``.npy`` files on disk): LZW-decoding a 320³ TIFF costs far more than
cutting a patch.

Padding (volumes smaller than the patch, or patches reaching out of the volume): the image is
padded with ``0.0`` *after* normalization (the volume mean in ``"zscore"`` mode, mid-grey in
``"fixed"`` mode; the same constant-zero padding sliding-window inference applies to the
normalized volume) and the label with the ignore label, so padded voxels never enter a loss.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import AugmentConfig, augment_batch
from .config import PatchShape, as_patch_shape, check_probability
from .data import (
    IGNORE_LABEL,
    DataError,
    DatasetIndex,
    IntensityStats,
    VolumeRecord,
    atomic_path,
    check_tiff_header,
    intensity_stats,
    normalize_intensity,
    read_label,
    read_volume,
)
from .prepare import CachedVolume, PreparedVolumes, surface_subsample

__all__ = [
    "SamplerConfig",
    "VolumeCache",
    "default_cache",
    "PatchDataset",
    "EpochSampler",
    "crop_patch",
    "collate_patches",
    "seed_worker",
    "make_loader",
    "PatchLoader",
    "worker_error_message",
    "check_labels",
]

_NORMALIZATION_MODES = ("zscore", "fixed")


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass
class SamplerConfig:
    """How training patches are drawn.

    Args:
        patch_size: ``(Z, Y, X)`` patch shape; an int means a cube. The network's divisor
            (:func:`~kaggle_utils.models.model_divisor`: 32 for smp-3d, the product of the strides for
            the nnU-Net archs) is checked by :class:`~kaggle_utils.train.config.TrainConfig`.
        patches_per_epoch: length of one epoch of :class:`PatchDataset`.
        surface_share: share of patches centred on a surface voxel (label 1); the rest are uniform.
        center_jitter: offset of the chosen surface voxel from the patch centre, drawn uniformly
            up to this fraction of the patch size per axis (then clamped to the volume).
        max_ignore_share: redraw a patch whose share of ignore voxels (padding included) exceeds
            this; ``1.0`` disables rejection.
        max_tries: draws per item before the patch with the lowest ignore share seen is kept.
        balance_scrolls: pick a scroll uniformly first, then one of its volumes (otherwise every
            volume is equally likely, so a scroll with 382 volumes dominates one with 13).
        cache_bytes: bound of the in-memory volume cache (LRU by bytes; per DataLoader worker);
            ``None`` (the default): ``train`` gives each worker its share of the run's memory budget
            (:mod:`kaggle_utils.memory`), and a dataset built outside ``train`` takes
            :data:`~kaggle_utils.memory.DEFAULT_CACHE_BYTES`.
        cache_dir: folder for decoded volumes as memory-mapped ``.npy`` files (shared by workers
            through the OS page cache; survives restarts). ``None`` keeps volumes in memory only.
        prepared: folder(s) of a cache written by ``python -m kaggle_utils prepare`` (a path or a
            list, e.g. one per attached dataset): patches are cut from its memory-mapped arrays,
            nothing is decoded (:class:`~kaggle_utils.prepare.PreparedVolumes`); ``cache_bytes``
            then bounds only labels of a cache prepared without them.
        normalization: ``"zscore"`` or ``"fixed"``, passed to ``data.normalize_intensity``.
        surface_points: at most this many surface voxel coordinates kept per volume (a
            deterministic subsample) for surface-centred sampling.
        ignore_label: label value excluded from losses; used for padding and rejection.
    """

    patch_size: PatchShape = (128, 128, 128)  # type: ignore[assignment]
    patches_per_epoch: int = 1000
    surface_share: float = 0.5
    center_jitter: float = 0.25
    max_ignore_share: float = 0.9
    max_tries: int = 10
    balance_scrolls: bool = False
    cache_bytes: int | None = None
    cache_dir: str | None = None
    prepared: str | list[str] | None = None
    normalization: str = "zscore"
    surface_points: int = 50_000
    ignore_label: int = IGNORE_LABEL

    def __post_init__(self) -> None:
        self.patch_size = as_patch_shape(self.patch_size, "sampler.patch_size")
        if self.patches_per_epoch < 1:
            raise ValueError(f"sampler.patches_per_epoch must be >= 1, got {self.patches_per_epoch}")
        check_probability("sampler.surface_share", self.surface_share)
        check_probability("sampler.max_ignore_share", self.max_ignore_share)
        if not 0.0 <= self.center_jitter <= 0.5:
            raise ValueError(f"sampler.center_jitter must be in [0, 0.5], got {self.center_jitter}")
        if self.max_tries < 1:
            raise ValueError(f"sampler.max_tries must be >= 1, got {self.max_tries}")
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise ValueError(f"sampler.cache_bytes must be >= 0 (or null: a share of the memory budget), "
                             f"got {self.cache_bytes}")
        if isinstance(self.prepared, str):
            self.prepared = [self.prepared]
        if self.prepared is not None and not self.prepared:
            self.prepared = None
        if self.normalization not in _NORMALIZATION_MODES:
            raise ValueError(
                f"sampler.normalization must be one of {list(_NORMALIZATION_MODES)}, got {self.normalization!r}"
            )
        if self.surface_points < 1:
            raise ValueError(f"sampler.surface_points must be >= 1, got {self.surface_points}")
        if not 0 <= self.ignore_label <= 255:
            raise ValueError(f"sampler.ignore_label must be a uint8 value, got {self.ignore_label}")


# ----------------------------------------------------------------------------------------------
# Volume cache
# ----------------------------------------------------------------------------------------------


class VolumeCache:
    """Decoded volumes by id: LRU bounded by resident bytes, optionally on disk as ``.npy``.

    Args:
        max_bytes: bound of resident bytes (the most recently used volume is always kept).
        cache_dir: folder for ``{id}.image.npy``/``{id}.label.npy``/``{id}.meta.npz``, opened
            memory-mapped; files are rebuilt when the source TIFF's size/mtime or
            ``surface_points`` change. ``None``: memory only.
        surface_points: see :class:`SamplerConfig`.

    Each DataLoader worker holds its own copy (workers forked after warm-up inherit the
    entries); pickling (spawned workers) drops the entries. ``hits``/``misses`` count lookups.
    """

    _VERSION = 1

    def __init__(self, max_bytes: int = 8 * 1024**3, cache_dir: str | os.PathLike | None = None,
                 surface_points: int = 50_000):
        self.max_bytes = int(max_bytes)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.surface_points = int(surface_points)
        self._entries: OrderedDict[str, CachedVolume] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_entries"] = OrderedDict()
        state["_bytes"] = 0
        return state

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def get(self, record: VolumeRecord) -> CachedVolume:
        """The decoded volume of ``record`` (read and cached on first use)."""
        entry = self._entries.get(record.id)
        if entry is not None:
            self._entries.move_to_end(record.id)
            self.hits += 1
            return entry
        self.misses += 1
        entry = self._load(record)
        self._entries[record.id] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
        return entry

    # -- loading ---------------------------------------------------------------------------------

    def _decode(self, record: VolumeRecord) -> CachedVolume:
        if record.label_path is None:
            raise DataError(f"{record.image_path}: id {record.id!r} has no label file; patches need labels")
        image = read_volume(record.image_path)
        label = read_label(record.label_path)
        if image.shape != label.shape:
            raise DataError(
                f"{record.label_path}: label shape {tuple(label.shape)} != image shape "
                f"{tuple(image.shape)} ({record.image_path.name})"
            )
        return CachedVolume(image, label, intensity_stats(image),
                            surface_subsample(label, record.id, self.surface_points))

    def _load(self, record: VolumeRecord) -> CachedVolume:
        if self.cache_dir is None:
            return self._decode(record)
        base = self.cache_dir / record.id
        img_p, lbl_p, meta_p = (Path(f"{base}.image.npy"), Path(f"{base}.label.npy"), Path(f"{base}.meta.npz"))
        src = Path(record.image_path).stat()
        lsrc = Path(record.label_path).stat() if record.label_path is not None else src
        stamp = np.array([self._VERSION, src.st_size, src.st_mtime_ns, lsrc.st_size, lsrc.st_mtime_ns,
                          self.surface_points], dtype=np.int64)
        if img_p.exists() and lbl_p.exists() and meta_p.exists():
            try:
                with np.load(meta_p) as meta:
                    if np.array_equal(meta["stamp"], stamp):
                        stats = IntensityStats(*(float(v) for v in meta["stats"]))
                        surface = meta["surface"].astype(np.int32)
                        image = np.load(img_p, mmap_mode="r")
                        label = np.load(lbl_p, mmap_mode="r")
                        if image.shape == label.shape and image.dtype == np.uint8:
                            return CachedVolume(image, label, stats, surface)
            except (OSError, ValueError, KeyError):
                pass  # stale or half-written cache entry: rebuild it below
        vol = self._decode(record)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for path, arr in ((img_p, vol.image), (lbl_p, vol.label)):
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr)
        s = vol.stats
        with atomic_path(meta_p) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, stamp=stamp, stats=np.array([s.lo, s.hi, s.mean, s.std]), surface=vol.surface)
        return CachedVolume(np.load(img_p, mmap_mode="r"), np.load(lbl_p, mmap_mode="r"), vol.stats, vol.surface)


def default_cache(cfg: SamplerConfig, cache_bytes: int | None = None):
    """The volume source ``cfg`` asks for: :class:`~kaggle_utils.prepare.PreparedVolumes` over
    ``cfg.prepared``, else a :class:`VolumeCache` of ``cache_bytes`` (default ``cfg.cache_bytes``, and
    :data:`~kaggle_utils.memory.DEFAULT_CACHE_BYTES` when that is ``None``)."""
    from .memory import DEFAULT_CACHE_BYTES

    size = cache_bytes if cache_bytes is not None else cfg.cache_bytes
    size = DEFAULT_CACHE_BYTES if size is None else int(size)
    if cfg.prepared:

        return PreparedVolumes(cfg.prepared, cfg.surface_points, label_cache_bytes=size)
    return VolumeCache(size, cfg.cache_dir, cfg.surface_points)


# ----------------------------------------------------------------------------------------------
# Cropping
# ----------------------------------------------------------------------------------------------


def _crop_slices(shape: Sequence[int], origin: Sequence[int], size: Sequence[int]):
    """Source and destination slices of the part of a patch that lies inside the volume."""
    src, dst = [], []
    for dim, o, p in zip(shape, origin, size):
        a, b = max(o, 0), min(o + p, dim)
        if b <= a:  # patch entirely outside along this axis
            a = b = 0
        src.append(slice(a, b))
        dst.append(slice(a - o, a - o + (b - a)))
    inside = all(s.start == 0 and s.stop == p for s, p in zip(dst, size))
    return tuple(src), tuple(dst), inside


def crop_patch(volume: np.ndarray, origin: Sequence[int], size: Sequence[int], fill: Any = 0) -> np.ndarray:
    """Cut ``volume[o : o + size]`` per axis; parts outside the volume are ``fill``.

    Args:
        volume: ``(Z, Y, X)`` array of any dtype.
        origin: ``(z, y, x)`` of the patch corner, may be negative or reach past the volume.
        size: ``(Z, Y, X)`` patch shape.

    Returns:
        ``(Z, Y, X)`` array of ``volume.dtype`` (a view when the patch lies inside the volume).
    """
    src, dst, inside = _crop_slices(volume.shape, origin, size)
    if inside:
        return volume[src]
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    out[dst] = volume[src]
    return out


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


def _item_seed(seed: int, epoch: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF])


class PatchDataset(Dataset):
    """Map-style dataset of training patches over the volumes of ``index``.

    Item ``i`` is a deterministic function of ``(seed, epoch, i)`` (see :meth:`set_epoch`), so the
    same seed gives the same patches whatever the number of workers. ``dataset[(epoch, i)]`` also
    works (used by :class:`EpochSampler` so persistent workers follow the epoch).

    Args:
        index: volumes to sample from (e.g. the training part of a fold); all need labels.
        cfg: :class:`SamplerConfig`.
        seed: base seed.
        augment: :class:`AugmentConfig` applied per sample on the CPU, or ``None`` (e.g. when
            augmenting whole batches on the GPU with :func:`augment_batch`).
        cache: a :class:`VolumeCache` (or :class:`~kaggle_utils.prepare.PreparedVolumes`) to share;
            built from ``cfg`` when ``None`` (``cfg.prepared`` opens the prepared cache, without
            checking it against the data folder: ``train`` does that).

    Items:
        ``(image, label, meta)``: image ``float32 (1, Z, Y, X)`` tensor (normalized),
        label ``uint8 (1, Z, Y, X)`` tensor, meta ``{"id", "scroll_id", "origin": (z, y, x)
        of the patch corner in the volume (negative when padded), "centred": bool}``.
    """

    def __init__(self, index: DatasetIndex, cfg: SamplerConfig, seed: int = 0,
                 augment: AugmentConfig | None = None, cache: VolumeCache | None = None):
        if len(index) == 0:
            raise ValueError("PatchDataset: the index holds no volumes")
        missing = [r.id for r in index if r.label_path is None]
        if missing:
            raise ValueError(f"PatchDataset: volumes without labels (test split?): {missing[:5]}")
        self.records = list(index)
        self.cfg = cfg
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0
        self.cache = cache if cache is not None else default_cache(cfg)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            groups.setdefault(r.scroll_id, []).append(i)
        self._scroll_groups = [groups[s] for s in sorted(groups)]

    def __len__(self) -> int:
        return self.cfg.patches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose patches ``dataset[i]`` returns."""
        self.epoch = int(epoch)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = (key if isinstance(key, tuple) else (self.epoch, key))
        if not 0 <= i < len(self):
            raise IndexError(f"patch index {i} out of range 0..{len(self) - 1}")
        ss = _item_seed(self.seed, epoch, i)
        np_seed, torch_seed = ss.spawn(2)
        rng = np.random.default_rng(np_seed)
        rec = self._pick_record(rng)
        vol = self.cache.get(rec)
        origin, centred = self._pick_origin(vol, rng)
        image, label = self._cut(vol, origin)
        img_t = torch.from_numpy(image)[None]
        lbl_t = torch.from_numpy(label)[None]
        if self.augment is not None:
            gen = torch.Generator().manual_seed(int(torch_seed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
            x, y = augment_batch(img_t[None], lbl_t[None], self.augment, gen, self.cfg.ignore_label)
            img_t, lbl_t = x[0], y[0]
        meta = {"id": rec.id, "scroll_id": rec.scroll_id, "origin": tuple(int(v) for v in origin),
                "centred": bool(centred)}
        return img_t, lbl_t, meta

    # -- steps ----------------------------------------------------------------------------------

    def _pick_record(self, rng: np.random.Generator) -> VolumeRecord:
        if self.cfg.balance_scrolls:
            group = self._scroll_groups[int(rng.integers(len(self._scroll_groups)))]
            return self.records[group[int(rng.integers(len(group)))]]
        return self.records[int(rng.integers(len(self.records)))]

    def _pick_origin(self, vol: CachedVolume, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        cfg = self.cfg
        size = np.asarray(cfg.patch_size)
        shape = np.asarray(vol.label.shape)
        lo = np.minimum(0, shape - size)
        hi = np.maximum(0, shape - size)
        centred = bool(rng.random() < cfg.surface_share) and len(vol.surface) > 0
        jitter = (cfg.center_jitter * size).astype(np.int64)
        best, best_share = None, 2.0
        for _ in range(cfg.max_tries):
            if centred:
                centre = vol.surface[int(rng.integers(len(vol.surface)))].astype(np.int64)
                offset = rng.integers(-jitter, jitter + 1)
                origin = np.clip(centre - size // 2 + offset, lo, hi)
            else:
                origin = rng.integers(lo, hi + 1)
            if cfg.max_ignore_share >= 1.0:
                return origin, centred
            share = self._ignore_share(vol.label, origin)
            if share <= cfg.max_ignore_share:
                return origin, centred
            if share < best_share:
                best, best_share = origin, share
        return best, centred

    def _ignore_share(self, label: np.ndarray, origin: Sequence[int]) -> float:
        size = self.cfg.patch_size
        src, _, _ = _crop_slices(label.shape, origin, size)
        crop = label[src]
        inside = crop.size
        n_ignore = np.count_nonzero(crop == self.cfg.ignore_label) + (int(np.prod(size)) - inside)
        return n_ignore / float(np.prod(size))

    def _cut(self, vol: CachedVolume, origin: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Normalized ``float32`` image and ``uint8`` label patches (crop first, then normalize)."""
        size = self.cfg.patch_size
        src, dst, inside = _crop_slices(vol.image.shape, origin, size)
        norm = normalize_intensity(vol.image[src], vol.stats, self.cfg.normalization)
        if inside:
            image = np.ascontiguousarray(norm, dtype=np.float32)
            label = np.array(vol.label[src], dtype=np.uint8)
        else:
            image = np.zeros(size, dtype=np.float32)
            image[dst] = norm
            label = np.full(size, self.cfg.ignore_label, dtype=np.uint8)
            label[dst] = vol.label[src]
        return image, label


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


class EpochSampler(Sampler):
    """Yields ``(epoch, i)`` for ``i`` in ``range(len(dataset))``, reading ``dataset.epoch`` in the
    main process at the start of each pass, so :meth:`PatchDataset.set_epoch` reaches persistent
    workers too. Items are already random; no shuffling is needed."""

    def __init__(self, dataset: PatchDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.dataset.epoch
        return iter([(epoch, i) for i in range(len(self.dataset))])


def collate_patches(batch: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Stack items into ``(image float32 (B,1,Z,Y,X), label uint8 (B,1,Z,Y,X), meta)`` where meta has
    lists ``id``, ``scroll_id``, ``origin int64 (B, 3)`` and ``centred bool (B,)``."""
    images, labels, metas = zip(*batch)
    meta = {
        "id": [m["id"] for m in metas],
        "scroll_id": [m["scroll_id"] for m in metas],
        "origin": torch.tensor([m["origin"] for m in metas], dtype=torch.int64),
        "centred": torch.tensor([m["centred"] for m in metas], dtype=torch.bool),
    }
    return torch.stack(images), torch.stack(labels), meta


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader: one torch thread per worker, and numpy/random seeded from
    torch's per-worker seed (patches themselves never depend on it; see :class:`PatchDataset`)."""
    import random

    torch.set_num_threads(1)
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def worker_error_message(exc: BaseException) -> str | None:
    """The original one-line message of a :class:`~kaggle_utils.data.DataError` re-raised by a
    DataLoader worker, or ``None`` when ``exc`` is not one.

    torch re-raises a worker's exception in the main process with the worker's whole traceback as
    its message (``Caught DataError in DataLoader worker process 0. Original Traceback ...``); the
    original message is what follows the last ``<module>.<type>: `` line of that traceback.
    """
    text = str(exc)
    if not isinstance(exc, DataError) or not text.startswith("Caught ") or "DataLoader worker" not in text:
        return None
    for name in (f"{type(exc).__module__}.{type(exc).__qualname__}", type(exc).__qualname__):
        at = text.rfind(f"\n{name}: ")
        if at >= 0:
            return text[at + len(name) + 3:].strip()
    return None


class _WorkerErrorIterator:
    """Wraps a DataLoader iterator: a worker's ``DataError`` comes out as the one line it was raised with."""

    def __init__(self, it: Iterator):
        self._it = it

    def __iter__(self) -> "_WorkerErrorIterator":
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self):
        try:
            return next(self._it)
        except DataError as exc:
            message = worker_error_message(exc)
            if message is None:
                raise
            raise type(exc)(message) from None


class PatchLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose worker processes report bad data as the main
    process does: a :class:`~kaggle_utils.data.DataError` raised in a worker (e.g. a label value
    255) is re-raised with its own one-line message, not with the worker's traceback."""

    def __iter__(self) -> Iterator:  # type: ignore[override]
        return _WorkerErrorIterator(super().__iter__())


def make_loader(dataset: PatchDataset, batch_size: int = 2, num_workers: int = 2,
                persistent_workers: bool = True, pin_memory: bool = False,
                prefetch_factor: int | None = 2, drop_last: bool = False) -> DataLoader:
    """:class:`PatchLoader` over ``dataset`` with :class:`EpochSampler`, :func:`seed_worker` and
    :func:`collate_patches`. Batches: ``(image (B,1,Z,Y,X) float32, label (B,1,Z,Y,X) uint8, meta)``.

    Persistent workers (default when ``num_workers > 0``) keep their volume caches across epochs;
    call ``dataset.set_epoch(e)`` before iterating epoch ``e``. A ``DataError`` in a worker is
    raised with its one-line message, as with ``num_workers=0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = persistent_workers
        kwargs["prefetch_factor"] = prefetch_factor
    return PatchLoader(dataset, batch_size=batch_size, sampler=EpochSampler(dataset),
                       num_workers=num_workers, collate_fn=collate_patches,
                       worker_init_fn=seed_worker, pin_memory=pin_memory, drop_last=drop_last, **kwargs)


def _check_record(record: VolumeRecord) -> None:
    """The per-id checks of ``check-data`` at train start: the image from its headers (a truncated file is a
    "corrupt TIFF" naming it, before its label is compared with it), the label decoded, their shapes."""
    if record.label_path is None:
        raise DataError(f"{record.image_path}: id {record.id!r} has no label file; patches need labels")
    shape = check_tiff_header(record.image_path)  # DataError: corrupt/truncated, not 3D, not uint8
    label = read_label(record.label_path)  # DataError: unreadable, or values outside {0, 1, 2}
    if shape != label.shape:
        raise DataError(f"{record.label_path}: label shape {tuple(label.shape)} != image shape {shape} "
                        f"({record.image_path})")


def check_labels(records: Sequence[VolumeRecord], workers: int = 1, progress: bool = True,
                 desc: str = "check labels") -> int:
    """Check every volume once before training: image headers intact, label values in ``{0, 1, 2}``, same shape.

    A bad label otherwise surfaces only when a patch of it is first drawn, possibly hours into a
    run; this finds it in a few minutes (one LZW decode per label; the images' shapes come from
    their TIFF headers, without decoding them).

    Args:
        records: the volumes to check (e.g. the training and validation volumes of a fold).
        workers: threads reading labels in parallel (TIFF decoding releases the GIL).
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        The number of labels checked.

    Raises:
        DataError: the first bad label in ``records`` order, as one line naming its file.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress_bar

    records = list(records)
    bar = progress_bar(total=len(records), desc=desc, unit="label", leave=False, enabled=progress)
    try:
        if workers <= 1 or len(records) <= 1:
            for rec in records:
                _check_record(rec)
                bar.update()
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for _ in pool.map(_check_record, records):  # in order: the first bad record is reported
                    bar.update()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # after a bad label, read no more
    finally:
        bar.close()
    return len(records)
