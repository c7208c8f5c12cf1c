"""The submission: ``submission.zip`` with one ``{id}.tif`` (``uint8 (Z, Y, X)``, 0/1) per test id.

Three pieces:

- :func:`write_submission` streams ``(id, mask)`` pairs into the zip one volume at a time
  (memory stays flat for ~120 volumes) and writes atomically (temp file beside the target, then
  ``os.replace``): a crash leaves either the old zip or none, never half of one. The TIFFs are
  zlib-compressed (:data:`SUBMISSION_TIFF_COMPRESSION`): tifffile writes that with Python's own
  zlib (no ``imagecodecs``, which Kaggle's image lacks) and the scorer's PIL reads it.
- :func:`validate_submission` checks a zip against ``test.csv`` and the test images: ids
  (missing, extra, duplicated), entry names (no directories, no ``..``, no absolute paths,
  ``.tif`` suffix), readable TIFFs, shapes, dtype ``uint8`` and values in ``{0, 1}``.
- :func:`predict_dataset` runs read → normalize → sliding-window inference → post-processing →
  stage for every test id, within a time budget, then zips the staged masks and validates the
  zip. Each finished mask is first written to ``<out>.parts/{id}.tif`` (:func:`staging_dir`), so
  no predicted volume is lost when building the zip fails, and a rerun with the same ``out_zip``
  reuses the valid staged masks instead of predicting them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .data import (DataError, MissingCodecError, atomic_path, load_index, normalize_intensity, read_volume,
                   tiff_codec_problem, write_probs, write_volume)

__all__ = [
    "SubmissionError",
    "SUBMISSION_TIFF_COMPRESSION",
    "write_submission",
    "staging_dir",
    "validate_submission",
    "read_tiff_shape",
    "PredictReport",
    "predict_dataset",
    "plan_tta",
    "DEFAULT_TIME_LIMIT_S",
]

log = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT_S = 9 * 3600 * 0.9
"""Kaggle's 9-hour limit for a code-competition rerun, with 10 % kept in reserve."""


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


def _check_id(volume_id: str) -> str:
    volume_id = str(volume_id)
    if not volume_id or volume_id in (".", "..") or _ID_BAD.search(volume_id):
        raise SubmissionError(f"invalid volume id {volume_id!r}: must be a plain file name stem")
    return volume_id


def _as_mask(volume_id: str, mask: np.ndarray) -> np.ndarray:
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


def write_submission(
    items: Iterable[tuple[str, np.ndarray | str | os.PathLike]],
    out_zip: str | os.PathLike,
    compression: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """Write ``submission.zip`` atomically, one volume at a time.

    Args:
        items: ``(id, mask)`` pairs; ``mask`` is ``uint8``/``bool``/integer ``(Z, Y, X)``, written
            as a zlib-compressed ``uint8`` 0/1 TIFF (any non-zero → 1), or the path of a TIFF
            already in that format (a mask staged by :func:`predict_dataset`), copied as it is.
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
                volume_id = _check_id(volume_id)
                if volume_id in seen:
                    raise SubmissionError(f"{out_zip}: id {volume_id!r} written twice")
                seen.add(volume_id)
                if isinstance(mask, (str, os.PathLike)):
                    zf.write(mask, f"{volume_id}.tif")
                else:
                    zf.writestr(f"{volume_id}.tif", _tiff_bytes(_as_mask(volume_id, mask)))
                del mask
    return out_zip


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def read_tiff_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape of the first series of a TIFF from its headers only (no pixel decoding)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(int(s) for s in tif.series[0].shape)
    except Exception as exc:
        raise DataError(f"{path}: cannot read TIFF header ({type(exc).__name__}: {exc})") from None


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


class _TiffErrors(logging.Handler):
    """Collects the ERROR records tifffile logs while it reads a damaged file."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _check_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, expected_shape: tuple[int, ...] | None) -> list[str]:
    import tifffile

    name = info.filename
    try:
        data = zf.read(info)
    except Exception as exc:  # BadZipFile (CRC), zlib errors, ...
        return [f"{name}: cannot read zip entry ({type(exc).__name__}: {exc})"]
    errors = _TiffErrors()
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(errors)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) == 0 or not tif.series:
                raise ValueError("no image pages")
            codec_problem = tiff_codec_problem(tif, name)
            if codec_problem is not None:
                return [codec_problem]
            vol = tif.asarray()
        if errors.messages:  # tifffile logs (not raises) truncated pages and bad offsets
            raise ValueError("; ".join(errors.messages[:2]))
    except Exception as exc:
        return [f"{name}: not a readable TIFF, truncated or corrupt ({type(exc).__name__}: {exc})"]
    finally:
        tiff_log.removeHandler(errors)
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
                shape = read_tiff_shape(expected[vid].image_path)
            except DataError as exc:
                problems.append(str(exc))
                shape = None
            problems.extend(_check_entry(zf, info, shape))
    return problems


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


@dataclass
class PredictReport:
    """What :func:`predict_dataset` did.

    Attributes:
        out_zip: the written submission.
        n_volumes: test ids processed.
        seconds: wall time of the whole run.
        volumes: one dict per id: ``id, shape, seconds, fg_fraction, tta_passes, error, reused``
            (reused ids come first, with ``shape``, ``fg_fraction`` and ``tta_passes`` ``None``).
        errors: ``{id: message}`` of volumes that failed and were submitted empty.
        tta: the TTA setting at the end of the run (after any reductions).
        notes: human-readable notes (TTA dropped for time, staged volumes reused, ...).
        reused: ids whose mask was taken from the staging folder of an earlier, interrupted run
            (:func:`staging_dir`) instead of being predicted again.
    """

    out_zip: Path
    n_volumes: int = 0
    seconds: float = 0.0
    volumes: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    tta: Any = None
    notes: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"note: {n}" for n in self.notes]
        lines += [f"error: {vid}: {msg}" for vid, msg in self.errors.items()]
        lines.append(f"wrote {self.out_zip}: {self.n_volumes} volume(s) in {self.seconds:.0f} s, "
                     f"{len(self.errors)} failed (submitted empty), validated")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "out_zip": str(self.out_zip), "n_volumes": self.n_volumes, "seconds": self.seconds,
            "volumes": self.volumes, "errors": self.errors, "tta": _jsonable(self.tta), "notes": self.notes,
            "reused": self.reused,
        }


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _tta_list(tta: Any) -> list:
    """The TTA passes of ``tta`` (preset name, list of ``TTATransform`` or ``None``) as a list."""
    from .inference import tta_transforms

    return list(tta_transforms(tta))


def _n_tta(tta: Any) -> int:
    try:
        return len(_tta_list(tta))
    except (ValueError, TypeError):
        return len(tta) if isinstance(tta, (list, tuple)) and tta else 1


def plan_tta(tta: Any, seconds_per_volume: float, remaining: int, seconds_left: float) -> Any:
    """Halve the TTA list until ``remaining`` volumes fit in ``seconds_left``.

    The per-volume time is assumed proportional to the number of TTA passes (inference
    dominates). Keeps the first half each time (``inference.tta_transforms`` puts the identity
    first). A non-list ``tta`` (``None``, a preset name) is returned unchanged: resolve presets
    with ``inference.tta_transforms`` first.

    Args:
        tta: the current TTA list (one entry per pass) or ``None``.
        seconds_per_volume: measured mean time per volume with ``tta``.
        remaining: volumes still to predict.
        seconds_left: time left in the budget.

    Returns:
        The (possibly shorter) TTA list.
    """
    if not isinstance(tta, (list, tuple)):
        return tta
    current = list(tta)
    per = float(seconds_per_volume)
    while len(current) > 1 and per * remaining > seconds_left:
        new = current[: len(current) // 2]
        per *= len(new) / len(current)
        current = new
    return type(tta)(current) if isinstance(tta, tuple) else current


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_models(checkpoints: Sequence[str | os.PathLike], device: str) -> tuple[list, list[dict], list[dict]]:
    from .models import load_checkpoint

    models, cfgs, ckpts = [], [], []
    for path in checkpoints:
        model, cfg, ckpt = load_checkpoint(path, map_location="cpu")
        models.append(model.to(device).eval())
        cfgs.append(cfg or {})
        ckpts.append(ckpt if isinstance(ckpt, dict) else {})
    return models, cfgs, ckpts


def _normalization_of(cfgs: list[dict], checkpoints: Sequence) -> str:
    modes = {}
    for path, cfg in zip(checkpoints, cfgs):
        mode = ((cfg.get("sampler") or {}).get("normalization")) or "zscore"
        modes[str(path)] = mode
    distinct = set(modes.values())
    if len(distinct) > 1:
        raise SubmissionError(
            f"checkpoints were trained with different intensity normalizations {modes}; an ensemble "
            "needs one normalization (mixing them silently costs ~0.2 score)"
        )
    return distinct.pop() if distinct else "zscore"


def _fold_of(cfgs: list[dict], ckpts: list[dict]) -> Any:
    folds = []
    for cfg, ckpt in zip(cfgs, ckpts):
        fold = ckpt.get("fold")
        if fold is None:
            fold = (cfg.get("train") or {}).get("fold")
        folds.append(fold)
    if not folds:
        return None
    return folds[0] if len(folds) == 1 else folds


def _inference_kwargs(inference_cfg: Any) -> dict:
    """Keyword arguments of ``sliding_window_predict`` taken from an InferenceConfig (or dict)."""
    import dataclasses
    import inspect

    from .inference import sliding_window_predict

    if inference_cfg is None:
        return {}
    raw = dataclasses.asdict(inference_cfg) if dataclasses.is_dataclass(inference_cfg) else dict(inference_cfg)
    params = inspect.signature(sliding_window_predict).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in raw.items() if k not in ("models", "volume")}
    return {k: v for k, v in raw.items() if k in params and k not in ("models", "volume")}


def _build_inference_cfg(inference_cfg: Any, cfgs: list[dict]) -> Any:
    if inference_cfg is not None:
        return inference_cfg
    section = (cfgs[0].get("inference") if cfgs else None) or {}
    from .config import from_dict
    from .inference import InferenceConfig

    return from_dict(InferenceConfig, section, "inference")


def _build_postprocess_cfg(postprocess_cfg: Any, cfgs: list[dict]):
    from .config import from_dict
    from .postprocess import PostprocessConfig

    if isinstance(postprocess_cfg, PostprocessConfig):
        return postprocess_cfg
    if isinstance(postprocess_cfg, dict):
        return from_dict(PostprocessConfig, postprocess_cfg, "postprocess")
    section = (cfgs[0].get("postprocess") if cfgs else None) or {}
    return from_dict(PostprocessConfig, section, "postprocess")


def _prefetch(records: Sequence, load: Callable[[Any], Any]) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Yield ``(record, load(record), error)``; the next record loads in a background thread
    (:class:`~kaggle_utils.inference.VolumePrefetcher`). A failing load is yielded as its error
    instead of ending the iteration."""
    from .inference import VolumePrefetcher

    def safe(i: int):
        try:
            return load(records[i]), None
        except Exception as exc:  # reported per volume, never kills the run
            return None, exc

    prefetcher = VolumePrefetcher(safe, range(len(records)), depth=1)
    try:
        for i, (loaded, err) in prefetcher:
            yield records[i], loaded, err
    finally:
        prefetcher.close()


def predict_dataset(
    checkpoints: Sequence[str | os.PathLike] | None = None,
    data_dir: str | os.PathLike | None = None,
    out_zip: str | os.PathLike = "submission.zip",
    *,
    models: Sequence[Any] | None = None,
    inference_cfg: Any = None,
    postprocess_cfg: Any = None,
    normalization: str | None = None,
    tta: Any = None,
    device: str | None = None,
    save_probs: str | os.PathLike | None = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    progress: bool = True,
) -> PredictReport:
    """Predict every id of ``test.csv`` and write a validated ``submission.zip``.

    Per volume: ``read_volume`` → ``normalize_intensity(mode=<checkpoint's sampler.normalization>)``
    → ``inference.sliding_window_predict`` (``float32 (Z, Y, X)`` probabilities) →
    ``postprocess.postprocess`` (``uint8`` 0/1) → staged ``<out_zip>.parts/{id}.tif``
    (:func:`staging_dir`). The next volume is read and normalized in a background thread while the
    current one is predicted. Then the staged masks are zipped (:func:`write_submission`) and the zip
    validated; the staging folder is removed only after that. A rerun with the same ``out_zip``
    reuses every valid staged mask made with the same weights and settings (``report.reused``, an
    INFO log line and a note) and predicts only the rest.

    Args:
        checkpoints: checkpoint files, full or exported (``models.export_checkpoint``; one = single
            model, several = ensemble); their configs give
            the normalization and, unless overridden, the ``inference`` and ``postprocess`` sections
            (taken from the first checkpoint).
        data_dir: competition-layout folder with ``test.csv`` and ``test_images/``.
        out_zip: the submission to write.
        models: in-memory ``nn.Module`` s instead of ``checkpoints`` (then ``normalization``
            defaults to ``"zscore"`` and the configs default to their dataclass defaults).
        inference_cfg: ``inference.InferenceConfig`` (or dict of ``sliding_window_predict``
            keyword arguments) overriding the checkpoint's.
        postprocess_cfg: ``PostprocessConfig`` or dict overriding the checkpoint's.
        normalization: ``"zscore"`` | ``"fixed"``; overrides the checkpoint's (use with care).
        tta: TTA preset name (``inference.TTA_PRESETS``) or list of ``TTATransform`` overriding the
            inference config's.
        device: ``"cuda"``/``"cpu"``; default CUDA when available.
        save_probs: folder for per-volume ``{id}.npy`` (``float16 (Z, Y, X)`` probabilities) and
            ``{id}.json`` sidecars (``id, scroll_id, fold, shape``), e.g. for threshold tuning.
        time_limit_s: wall-time budget of the whole run. After each volume the remaining time is
            projected; if it would not fit, the TTA list is halved (:func:`plan_tta`) and a note
            and a warning say so.
        progress: show a tqdm bar.

    Returns:
        :class:`PredictReport`. A volume that fails (unreadable, OOM after the inference
        fallbacks, ...) is submitted all-zero, its error recorded in ``report.errors`` and warned
        about; the run goes on.

    Raises:
        SubmissionError: building the zip failed or the zip fails :func:`validate_submission` (the
            message says where the staged masks are kept), or neither/both of ``checkpoints`` and
            ``models`` are given, or ensemble normalizations differ.
        MissingCodecError: a test image needs a codec that is not installed (LZW without
            ``imagecodecs``): raised at once instead of submitting every volume empty.
        DataError: ``data_dir`` is not a readable competition folder.
        CheckpointError: a checkpoint file is missing, unreadable or not a kaggle_utils checkpoint.
    """
    from tqdm.auto import tqdm

    from .inference import sliding_window_predict
    from .postprocess import postprocess

    t_start = time.perf_counter()
    if (checkpoints is None) == (models is None):
        raise SubmissionError("predict_dataset: pass exactly one of checkpoints= or models=")
    if data_dir is None:
        raise SubmissionError("predict_dataset: data_dir is required")
    device = device or _default_device()
    index = load_index(data_dir, "test")
    out_zip = Path(out_zip)

    if checkpoints is not None:
        checkpoints = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
        if not checkpoints:
            raise SubmissionError("predict_dataset: empty checkpoint list")
        model_list, cfgs, ckpts = _load_models(checkpoints, device)
        norm = normalization or _normalization_of(cfgs, checkpoints)
        fold = _fold_of(cfgs, ckpts)
    else:
        model_list = [m.to(device).eval() if hasattr(m, "to") else m for m in models]  # type: ignore[union-attr]
        cfgs, norm, fold = [], normalization or "zscore", None
    inf_cfg = _build_inference_cfg(inference_cfg, cfgs)
    pp_cfg = _build_postprocess_cfg(postprocess_cfg, cfgs)
    kwargs = _inference_kwargs(inf_cfg)
    kwargs["device"] = device
    from .environment import warn_slow_conv3d_amp
    from .inference import resolve_amp_dtype

    warn_slow_conv3d_amp(device, resolve_amp_dtype(kwargs.get("amp", "auto"), device) is not None)  # torch 2.9
    if tta is not None:
        _tta_list(tta)  # validates: ValueError names the allowed presets
        kwargs["tta"] = tta

    report = PredictReport(out_zip=out_zip, tta=kwargs.get("tta"))
    probs_dir = Path(save_probs) if save_probs is not None else None
    if probs_dir is not None:
        probs_dir.mkdir(parents=True, exist_ok=True)
    parts = staging_dir(out_zip)
    staged = _reusable_parts(parts, index, _run_fingerprint(model_list, norm, kwargs, pp_cfg))
    if staged:
        report.reused = list(staged)
        msg = (f"reusing {len(staged)} staged mask(s) of an earlier run from {parts} (not predicted again): "
               + ", ".join(list(staged)[:10]) + (" ..." if len(staged) > 10 else ""))
        report.notes.append(msg)
        log.info(msg)
    empty_shapes: dict[str, tuple[int, ...]] = {}  # failed ids, submitted all-zero
    for vid in staged:
        report.volumes.append({"id": vid, "shape": None, "seconds": 0.0, "fg_fraction": None,
                               "tta_passes": None, "error": None, "reused": True})

    def load(rec):
        vol = read_volume(rec.image_path)
        return vol.shape, normalize_intensity(vol, mode=norm)

    def note(msg: str) -> None:
        report.notes.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)

    todo = [rec for rec in index.records if rec.id not in staged]
    n = len(todo)
    since_change: list[float] = []
    bar = tqdm(total=n, desc="predict", unit="vol", disable=not progress)
    volumes = _prefetch(todo, load)
    try:
        for i, (rec, loaded, err) in enumerate(volumes):
            # loaded: (shape, float32 normalized volume), or None when err is set
            t0 = time.perf_counter()
            row = {"id": rec.id, "shape": None, "seconds": None, "fg_fraction": 0.0,
                   "tta_passes": _n_tta(kwargs.get("tta")), "error": None, "reused": False}
            if isinstance(err, MissingCodecError):  # a setup problem that would empty every volume
                if not staged:
                    shutil.rmtree(parts, ignore_errors=True)
                raise err
            try:
                if err is not None:
                    raise err
                shape, image = loaded
                row["shape"] = list(shape)
                prob = np.asarray(sliding_window_predict(model_list, image, **kwargs), dtype=np.float32)
                del image, loaded
                if prob.shape != tuple(shape):
                    raise RuntimeError(f"inference returned shape {prob.shape}, expected {tuple(shape)}")
                if probs_dir is not None:
                    write_probs(probs_dir, rec.id, rec.scroll_id, prob, fold)
                mask = postprocess(prob, pp_cfg)
                del prob
                row["fg_fraction"] = float(mask.mean()) if mask.size else 0.0
                staged[rec.id] = write_volume(parts / f"{_check_id(rec.id)}.tif", _as_mask(rec.id, mask),
                                              compression=SUBMISSION_TIFF_COMPRESSION)
                del mask
            except Exception as exc:  # one bad volume must not kill the submission
                msg = f"{type(exc).__name__}: {exc}"
                prob = image = loaded = mask = None  # drop references before freeing device memory
                _free_device_memory()
                report.errors[rec.id] = msg
                row["error"] = msg
                note(f"{rec.id}: prediction failed, submitting an empty mask ({msg})")
                try:
                    empty_shapes[rec.id] = tuple(row["shape"] or read_tiff_shape(rec.image_path))
                except Exception as exc2:
                    note(f"{rec.id}: cannot even read the image shape ({exc2}); entry left out")
            row["seconds"] = time.perf_counter() - t0
            report.volumes.append(row)
            bar.update(1)
            # time budget: project the rest with the mean time under the current TTA setting
            if row["error"] is None:
                since_change.append(row["seconds"])
            remaining = n - (i + 1)
            tta = kwargs.get("tta")
            if remaining and since_change and _n_tta(tta) > 1:
                per = float(np.mean(since_change))
                left = time_limit_s - (time.perf_counter() - t_start)
                new = plan_tta(_tta_list(tta), per, remaining, left)
                if _n_tta(new) < _n_tta(tta):
                    note(
                        f"time budget: {remaining} volume(s) left at ~{per:.1f} s each with "
                        f"{_n_tta(tta)} TTA passes would need {per * remaining:.0f} s but "
                        f"{left:.0f} s remain; dropping to {_n_tta(new)} TTA passes {_jsonable(new)}"
                    )
                    kwargs["tta"] = new
                    report.tta = new
                    since_change = []
    finally:
        volumes.close()
        bar.close()

    def entries() -> Iterator[tuple[str, np.ndarray | Path]]:
        for rec in index.records:  # test.csv order
            if rec.id in staged:
                yield rec.id, staged[rec.id]
            elif rec.id in empty_shapes:
                yield rec.id, np.zeros(empty_shapes[rec.id], np.uint8)

    kept = f"the {len(staged)} predicted mask(s) are kept in {parts}; rerun the same command to zip them without predicting again"
    try:
        write_submission(entries(), out_zip)
    except Exception as exc:
        raise SubmissionError(f"{out_zip}: building the zip failed ({type(exc).__name__}: {exc}); {kept}") from exc
    report.n_volumes = len(report.volumes)
    problems = validate_submission(out_zip, data_dir)
    report.seconds = time.perf_counter() - t_start
    if problems:
        raise SubmissionError(
            f"{out_zip}: written but invalid ({len(problems)} problem(s)): " + "; ".join(problems[:5]) + f"; {kept}"
        )
    shutil.rmtree(parts, ignore_errors=True)
    if report.errors:
        note(f"{len(report.errors)} volume(s) failed and were submitted empty: {sorted(report.errors)}")
    return report


def staging_dir(out_zip: str | os.PathLike) -> Path:
    """Where :func:`predict_dataset` stages finished masks before zipping them: ``<out_zip>.parts/``.

    Holds one submission-format ``{id}.tif`` per predicted volume (written atomically) and
    ``run.json`` (a fingerprint of the models and settings that made them). Removed after a zip
    that validated; left in place when anything fails, for the next run to reuse.
    """
    out_zip = Path(out_zip)
    return out_zip.with_name(out_zip.name + ".parts")


def _run_fingerprint(models: Sequence[Any], normalization: str, inference_kwargs: dict, pp_cfg: Any) -> str:
    """Hash of everything that decides the masks: weights, normalization, inference and post-processing
    settings (not the device). Staged masks are reused only under the same fingerprint."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for model in models:
        h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
        state = model.state_dict() if hasattr(model, "state_dict") else {}
        for key, value in state.items():
            h.update(key.encode())
            if hasattr(value, "detach"):
                value = value.detach().cpu().contiguous()
                h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                h.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
            else:
                h.update(repr(value).encode())
    settings = {"normalization": normalization, "postprocess": repr(pp_cfg),
                "inference": {k: repr(v) for k, v in inference_kwargs.items() if k != "device"}}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def _staged_problem(path: Path, image_path: Path) -> str | None:
    """Why a staged mask cannot be reused (unreadable, wrong shape, not 0/1), or ``None``."""
    try:
        mask = read_volume(path)
        shape = read_tiff_shape(image_path)
    except DataError as exc:
        return str(exc)
    if tuple(mask.shape) != tuple(shape):
        return f"shape {tuple(mask.shape)} != test image shape {tuple(shape)}"
    if mask.size and int(mask.max()) > 1:
        return f"values outside {{0, 1}} (max {int(mask.max())})"
    return None


def _reusable_parts(parts: Path, index: Any, fingerprint: str) -> dict[str, Path]:
    """Staged masks of an earlier run with the same fingerprint that are still valid, as ``{id: path}``
    (in ``test.csv`` order). Prepares ``parts`` for this run: stale or invalid files are removed and
    ``run.json`` holds this run's fingerprint."""
    manifest = parts / "run.json"
    reusable: dict[str, Path] = {}
    if parts.is_dir():
        try:
            previous = json.loads(manifest.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            previous = None
        stale = sorted(parts.glob("*.tif"))
        if previous != fingerprint:
            if stale:
                log.warning("%s: %d staged mask(s) come from other models or settings; predicting them again",
                            parts, len(stale))
        else:
            by_id = {p.stem: p for p in stale}
            for rec in index.records:
                path = by_id.pop(rec.id, None)
                if path is None:
                    continue
                problem = _staged_problem(path, rec.image_path)
                if problem is None:
                    reusable[rec.id] = path
                else:
                    log.warning("%s: staged mask not reusable (%s); predicting it again", path, problem)
            stale = [p for p in stale if p.stem not in reusable]
        for path in stale:
            path.unlink(missing_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_path(manifest) as tmp:
        Path(tmp).write_text(json.dumps({"fingerprint": fingerprint}))
    return reusable


def _free_device_memory() -> None:
    """Release cached CUDA blocks after a failed volume (e.g. OOM), so the next one starts clean."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never let cleanup hide the original error
        pass
