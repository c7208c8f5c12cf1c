"""Predicting the test set: ``predict_dataset`` runs every test id through the model(s) into a
validated ``submission.zip``.

Per volume: ``data.read_volume`` → ``data.normalize_intensity`` (the checkpoint's normalization) →
``inference.predict_volume`` (the same settings-to-inference path as training's validation and
out-of-fold probabilities) → ``postprocess.postprocess`` → a staged ``<out>.parts/{id}.tif``
(:func:`staging_dir`). The next volume is read in a background thread while the current one is
predicted. The staged masks are then zipped (``submission.write_submission``) and validated
(``submission.validate_submission``); a rerun with the same ``out_zip`` reuses valid staged masks.

Faults are found before any work where they can be: the device, the output path and every
checkpoint are checked before the first volume is read (:class:`PredictError`,
``models.CheckpointError``: one line naming the file). A volume that cannot be read or predicted is
submitted empty (it still scores) and reported once; a run where nothing could be predicted raises
:class:`PredictFailed` instead of writing an all-empty zip. SIGTERM (and SIGINT) end the run as
:class:`Interrupted` after removing temp files; the staged masks are kept for the rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import submission as _submission
from .device import DeviceError, check_gpu_supported, resolve_device
from .data import DataError, MissingCodecError, atomic_path, load_index, mask_shape, normalize_intensity, \
    read_volume, write_volume
from .probs import check_prob_format, write_probs
from .submission import SUBMISSION_TIFF_COMPRESSION, SubmissionError, as_submission_mask, check_volume_id

__all__ = [
    "DEFAULT_TIME_LIMIT_S",
    "PredictError",
    "PredictFailed",
    "PredictWarning",
    "Interrupted",
    "PredictReport",
    "predict_dataset",
    "plan_tta",
    "staging_dir",
    "check_out_path",
    "load_models",
    "trained_with",
]


log = logging.getLogger(__name__)

DEFAULT_TIME_LIMIT_S = 9 * 3600 * 0.9
"""Kaggle's 9-hour limit for a code-competition rerun, with 10 % kept in reserve."""


class PredictError(ValueError):
    """A setup problem found before any volume is read (device, output path). One line naming it."""


class PredictFailed(SubmissionError):
    """No test volume could be predicted; no zip was written.

    Attributes:
        errors: ``{id: message}``, one per failed volume.
    """

    def __init__(self, message: str, errors: dict[str, str]):
        super().__init__(message)
        self.errors = dict(errors)


class PredictWarning(RuntimeWarning):
    """A volume submitted empty, TTA dropped for time, ...: everything here is also in the report."""


class Interrupted(KeyboardInterrupt):
    """The run got SIGTERM or SIGINT; temp files are removed, staged masks kept.

    Attributes:
        signum: the signal number.
    """

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _version_stamp() -> str:
    from .version import version_stamp

    return version_stamp()


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
        device: the device the models ran on.
        code_version: the version stamp of the code that predicted (:func:`kaggle_utils.version.version_stamp`).
    """

    out_zip: Path
    n_volumes: int = 0
    seconds: float = 0.0
    volumes: list[dict] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    tta: Any = None
    notes: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    device: str | None = None
    code_version: str = field(default_factory=_version_stamp)

    def __str__(self) -> str:
        lines = [f"note: {n}" for n in self.notes]
        lines += [f"error: {vid}: {msg}" for vid, msg in self.errors.items()]
        lines.append(f"wrote {self.out_zip}: {self.n_volumes} volume(s) in {self.seconds:.0f} s, "
                     f"{len(self.errors)} failed (submitted empty), validated (kaggle_utils {self.code_version})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "out_zip": str(self.out_zip), "n_volumes": self.n_volumes, "seconds": self.seconds,
            "volumes": self.volumes, "errors": self.errors, "tta": _jsonable(self.tta), "notes": self.notes,
            "reused": self.reused, "device": self.device, "code_version": self.code_version,
        }


# ----------------------------------------------------------------------------------------------
# Checks before any volume is read
# ----------------------------------------------------------------------------------------------


def _checked_device(device: Any) -> str:
    """``device`` checked by :func:`kaggle_utils.device.resolve_device` (``None``: CUDA when available), as the
    string the report records (``"cpu"``, ``"cuda:0"``).

    Raises:
        PredictError: the :class:`~kaggle_utils.device.DeviceError` line (no GPU for ``"cuda"``, not a device name).
    """
    try:
        return str(resolve_device(device))
    except DeviceError as exc:
        raise PredictError(str(exc)) from None


def check_out_path(out_zip: str | os.PathLike, save_probs: str | os.PathLike | None = None) -> Path:
    """Check that ``out_zip`` (``submission.check_out_zip``), its staging folder and ``save_probs``
    can be written, before any work.

    Raises:
        OutputPathError: ``out_zip`` is a folder, its parent is a file, or the folder is not writable.
        PredictError: the staging folder name is taken by a file; ``save_probs`` is not writable.
    """
    out_zip = _submission.check_out_zip(out_zip)
    parts = staging_dir(out_zip)
    if parts.exists() and not parts.is_dir():
        raise PredictError(f"{parts}: exists and is not a folder; it is where finished masks are staged: remove it")
    if save_probs is not None:
        from .outputs import OutputError, check_output

        try:
            check_output(save_probs, "dir", what="--save-probs")
        except OutputError as exc:
            raise PredictError(f"cannot write probabilities there: {exc}") from None
    return out_zip


def load_models(checkpoints: Sequence[str | os.PathLike], device: str) -> tuple[list, list[dict], list[dict]]:
    """Load every checkpoint (full or exported) onto ``device``; ``(models, configs, checkpoint dicts)``.

    Raises:
        CheckpointError: one line naming the file and what is wrong (missing, empty, truncated, not
            a torch file, a bare state_dict, weights of another architecture, ...).
    """
    from .models import CheckpointError, load_checkpoint

    models, cfgs, ckpts = [], [], []
    for path in checkpoints:
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
        try:
            model, cfg, ckpt = load_checkpoint(path, map_location="cpu")
        except CheckpointError:
            raise  # models._torch_load words it; never torch's advice to unpickle with weights_only=False
        except Exception as exc:  # a config the model builder rejects, an odd 'model' entry, ...
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CheckpointError(f"{path}: cannot rebuild the model ({type(exc).__name__}: {first})") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise CheckpointError(f"{path}: the 'model' entry is not a state dict")
        models.append(model.to(device).eval())
        cfgs.append(cfg or {})
        ckpts.append(ckpt)
        log.info("predict: %s trained with kaggle_utils %s", path, trained_with(ckpt))
    return models, cfgs, ckpts


def trained_with(ckpt: dict) -> str:
    """The version stamp of the code that trained a checkpoint (an exported file keeps its training's)."""
    from .version import CHECKPOINT_KEY

    return str(ckpt.get("trained_with") or ckpt.get(CHECKPOINT_KEY) or "unknown (written before version stamps)")


# ----------------------------------------------------------------------------------------------
# Signals and temp files
# ----------------------------------------------------------------------------------------------


class _SignalGuard:
    """Turn SIGTERM/SIGINT into :class:`Interrupted` while predicting (main thread only), so every
    ``atomic_path`` unwinds and removes its temp file. Restores the previous handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _remove_stale_temp_files(out_zip: Path, folders: Sequence[Path]) -> None:
    """Temp files of an earlier run killed by SIGKILL (no handler runs): ``.{out}.*.tmp`` beside the
    zip and ``.*.tmp`` in the staging and probabilities folders."""
    stale = list(out_zip.parent.glob(f".{out_zip.name}.*.tmp"))
    for folder in folders:
        if folder.is_dir():
            stale += folder.glob(".*.tmp")
    for path in stale:
        try:
            path.unlink()
            log.info("removed %s, a temp file of an interrupted run", path)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """State of one :func:`predict_dataset` run shared by its steps."""

    models: list
    settings: Any  # inference.InferenceConfig
    tta: Any  # preset name or list of TTATransform; halved when time runs short
    normalization: str
    pp_cfg: Any
    device: str
    fold: Any
    parts: Path
    probs_dir: Path | None
    report: PredictReport
    staged: dict[str, Path] = field(default_factory=dict)
    empty_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    prefetch: int = 1  # volumes read ahead (0 when the memory budget has no room for them)
    probs_format: str = "uint8"  # of save_probs (probs.PROB_FORMATS)

    def note(self, msg: str) -> None:
        """A note for the report, also warned about (and logged) at once."""
        self.report.notes.append(msg)
        warnings.warn(msg, PredictWarning, stacklevel=3)
        log.warning(msg)


def _warn_once(msg: str) -> None:
    """A failure that the report lists anyway: warned about once (not logged, not a note)."""
    warnings.warn(msg, PredictWarning, stacklevel=3)


def _predict_one(run: _Run, rec: Any, loaded: Any, err: BaseException | None, row: dict) -> None:
    """Predict, post-process and stage one volume (``loaded``: ``(shape, float32 volume)``); a failure
    is recorded in ``row``/the report and the volume submitted empty."""
    from .inference import predict_volume
    from .postprocess import postprocess

    try:
        if err is not None:
            raise err
        shape, image = loaded
        row["shape"] = list(shape)
        prob = np.asarray(predict_volume(run.models, image, run.settings, run.device, tta=run.tta), dtype=np.float32)
        del image, loaded
        if prob.shape != tuple(shape):
            raise RuntimeError(f"inference returned shape {prob.shape}, expected {tuple(shape)}")
        if run.probs_dir is not None:
            write_probs(run.probs_dir, rec.id, rec.scroll_id, prob, run.fold, fmt=run.probs_format)
        mask = postprocess(prob, run.pp_cfg)
        del prob
        row["fg_fraction"] = float(mask.mean()) if mask.size else 0.0
        run.staged[rec.id] = write_volume(run.parts / f"{check_volume_id(rec.id)}.tif", as_submission_mask(rec.id, mask),
                                          compression=SUBMISSION_TIFF_COMPRESSION)
        del mask
    except Exception as exc:  # one bad volume must not kill the submission
        msg = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        prob = image = loaded = mask = None  # drop references before freeing device memory
        _free_device_memory()
        run.report.errors[rec.id] = msg
        row["error"] = msg
        try:
            run.empty_shapes[rec.id] = mask_shape(rec.image_path)
            _warn_once(f"{rec.id}: prediction failed, submitting an empty mask ({msg})")
        except DataError as exc2:
            _warn_once(f"{rec.id}: prediction failed ({msg}) and the image shape is unreadable ({exc2}); "
                       "entry left out")


def _fit_time_budget(run: _Run, since_change: list[float], remaining: int, seconds_left: float) -> bool:
    """Halve the TTA passes when ``remaining`` volumes would not fit; ``True`` when it did."""
    if not remaining or not since_change or _n_tta(run.tta) <= 1:
        return False
    per = float(np.mean(since_change))
    new = plan_tta(_tta_list(run.tta), per, remaining, seconds_left)
    if _n_tta(new) >= _n_tta(run.tta):
        return False
    run.note(f"time budget: {remaining} volume(s) left at ~{per:.1f} s each with {_n_tta(run.tta)} TTA passes "
             f"would need {per * remaining:.0f} s but {seconds_left:.0f} s remain; dropping to {_n_tta(new)} "
             f"TTA passes {_jsonable(new)}")
    run.tta = run.report.tta = new
    return True


def _predict_all(run: _Run, todo: list, time_limit_s: float, t_start: float, progress: bool) -> None:
    """Every record of ``todo`` through :func:`_predict_one`, next volume prefetched, TTA cut to the budget."""
    from .progress import progress_bar

    def load(rec: Any) -> tuple[tuple[int, ...], np.ndarray]:
        vol = read_volume(rec.image_path)
        return vol.shape, normalize_intensity(vol, mode=run.normalization)

    since_change: list[float] = []
    bar = progress_bar(total=len(todo), desc="predict", unit="vol", enabled=progress)
    volumes = _prefetch(todo, load, run.prefetch)
    try:
        for i, (rec, loaded, err) in enumerate(volumes):
            if isinstance(err, MissingCodecError):  # a setup problem that would empty every volume
                raise err
            t0 = time.perf_counter()
            row = {"id": rec.id, "shape": None, "seconds": None, "fg_fraction": 0.0,
                   "tta_passes": _n_tta(run.tta), "error": None, "reused": False}
            _predict_one(run, rec, loaded, err, row)
            loaded = None
            row["seconds"] = time.perf_counter() - t0
            run.report.volumes.append(row)
            bar.update(1)
            if row["error"] is None:
                since_change.append(row["seconds"])
            left = time_limit_s - (time.perf_counter() - t_start)
            if _fit_time_budget(run, since_change, len(todo) - (i + 1), left):
                since_change = []
    finally:
        volumes.close()
        bar.close()


def _write_and_validate(run: _Run, index: Any, data_dir: Any, out_zip: Path) -> list[str]:
    """Zip the staged and empty masks in ``test.csv`` order; the validator's problems."""
    def entries() -> Iterator[tuple[str, np.ndarray | Path]]:
        for rec in index.records:
            if rec.id in run.staged:
                yield rec.id, run.staged[rec.id]
            elif rec.id in run.empty_shapes:
                yield rec.id, np.zeros(run.empty_shapes[rec.id], np.uint8)

    kept = (f"the {len(run.staged)} predicted mask(s) are kept in {run.parts}; rerun the same command to zip "
            "them without predicting again")
    try:
        _submission.write_submission(entries(), out_zip)
    except Exception as exc:
        raise SubmissionError(f"{out_zip}: building the zip failed ({type(exc).__name__}: {exc}); {kept}") from exc
    problems = _submission.validate_submission(out_zip, data_dir)
    if problems:
        raise SubmissionError(
            f"{out_zip}: written but invalid ({len(problems)} problem(s)): " + "; ".join(problems[:5]) + f"; {kept}"
        )
    return problems


def _nothing_predicted(run: _Run, n: int) -> PredictFailed:
    errors = run.report.errors
    first = "; ".join(f"{vid}: {msg}" for vid, msg in list(errors.items())[:3])
    return PredictFailed(
        f"no test volume could be predicted: all {n} failed ({first}{' ...' if len(errors) > 3 else ''}); "
        "no submission written", errors)


def _setup(checkpoints: Any, models: Any, normalization: str | None, device: str,
           inference_cfg: Any, postprocess_cfg: Any, tta: Any) -> tuple[list, str, Any, Any, Any, Any]:
    """``(models, normalization, fold, inference settings, postprocess settings, tta)``; checkpoints loaded."""
    from .device import resolve_amp_dtype, warn_slow_conv3d_amp
    from .inference import as_inference_config

    if checkpoints is not None:
        checkpoints = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
        if not checkpoints:
            raise PredictError("predict_dataset: empty checkpoint list")
        model_list, cfgs, ckpts = load_models(checkpoints, device)
        norm = normalization or _normalization_of(cfgs, checkpoints)
        fold = _fold_of(cfgs, ckpts)
    else:
        model_list = [m.to(device).eval() if hasattr(m, "to") else m for m in models]
        cfgs, norm, fold = [], normalization or "zscore", None
    settings = as_inference_config(inference_cfg if inference_cfg is not None
                                   else (cfgs[0].get("inference") if cfgs else None) or {})
    pp_cfg = _build_postprocess_cfg(postprocess_cfg, cfgs)
    warn_slow_conv3d_amp(device, resolve_amp_dtype(settings.amp, device) is not None)  # torch 2.9
    if tta is not None:
        _tta_list(tta)  # validates: ValueError names the allowed presets
    return model_list, norm, fold, settings, pp_cfg, settings.tta if tta is None else tta


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
    probs_format: str = "uint8",
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    progress: bool = True,
    memory_gb: float | None = None,
) -> PredictReport:
    """Predict every id of ``test.csv`` and write a validated ``submission.zip`` (see the module doc).

    Args:
        checkpoints: checkpoint files, full or exported (one = single model, several = ensemble);
            their configs give the normalization and, unless overridden, the ``inference`` and
            ``postprocess`` sections (taken from the first checkpoint).
        data_dir: competition-layout folder with ``test.csv`` and ``test_images/``.
        out_zip: the submission to write; finished masks are staged in ``<out_zip>.parts/``.
        models: in-memory ``nn.Module`` s instead of ``checkpoints`` (normalization ``"zscore"``).
        inference_cfg: ``inference.InferenceConfig`` or a dict of its keys, overriding the checkpoint's.
        postprocess_cfg: ``PostprocessConfig`` or dict overriding the checkpoint's.
        normalization: ``"zscore"`` | ``"fixed"``; overrides the checkpoint's (use with care).
        tta: TTA preset name or list of ``TTATransform`` overriding the inference config's.
        device: ``"cuda"``/``"cpu"``; default CUDA when available (:func:`kaggle_utils.device.resolve_device`).
        save_probs: folder for per-volume probabilities + ``{id}.json`` sidecars (:func:`kaggle_utils.probs.write_probs`).
        probs_format: ``"uint8"`` (compact ``{id}.npz``, default) or ``"float16"`` (``{id}.npy``).
        time_limit_s: wall-time budget; TTA passes are halved (:func:`plan_tta`) when the rest would not fit.
        progress: show a tqdm bar.
        memory_gb: the memory budget in GiB; default 80 % of the free memory (:mod:`kaggle_utils.memory`).
            The models, the volume being predicted and the one read ahead must fit it: without room for
            the read-ahead it is turned off (a note), and a run that cannot fit at all stops before any
            volume (:class:`PredictError` naming what to lower).

    Returns:
        :class:`PredictReport`. A volume that fails is submitted all-zero (in the shape the scorer
        reads from its image), its error in ``report.errors`` and one :class:`PredictWarning`.

    Raises:
        PredictError: no GPU for ``device="cuda"``, the memory budget too small, neither/both of
            ``checkpoints`` and ``models``, no ``data_dir``, or ensemble normalizations differ (before any volume).
        OutputPathError: ``out_zip`` is a folder or not writable (before any work).
        CheckpointError: a checkpoint is missing, empty, truncated, not a kaggle_utils checkpoint or
            does not fit its architecture (before any volume is read).
        PredictFailed: not one volume could be predicted (no zip written).
        SubmissionError: building the zip failed or it does not validate (the staged masks are kept).
        MissingCodecError: the test images need a codec that is not installed.
        DataError: ``data_dir`` is not a readable competition folder.
        Interrupted: SIGTERM/SIGINT; temp files removed, staged masks kept.
    """
    from .memory import read_machine_memory

    t_start = time.perf_counter()
    machine = read_machine_memory()  # before the models are loaded: the budget is shared with them
    _check_sources(checkpoints, models, data_dir)
    check_prob_format(probs_format, "predict_dataset: probs_format")
    device = _checked_device(device)
    check_gpu_supported(device)  # UnsupportedGPUError: e.g. a P100 with a cu128 torch, before any work
    out_zip = check_out_path(out_zip, save_probs)
    index = load_index(data_dir, "test")
    run = _new_run(checkpoints, models, normalization, device, inference_cfg, postprocess_cfg, tta,
                   out_zip, save_probs, len(index.records))
    run.prefetch = _plan_memory(run, index.records, machine, memory_gb)
    run.probs_format = probs_format
    with _SignalGuard():
        todo = _stage_reusable(run, index, out_zip)
        _predict_todo(run, todo, time_limit_s, t_start, progress)
        run.report.n_volumes = len(run.report.volumes)
        _write_and_validate(run, index, data_dir, out_zip)
    run.report.seconds = time.perf_counter() - t_start
    shutil.rmtree(run.parts, ignore_errors=True)
    if run.report.errors:
        _warn_once(f"{len(run.report.errors)} volume(s) failed and were submitted empty: {sorted(run.report.errors)}")
    return run.report


def _plan_memory(run: _Run, records: Sequence, machine: Any, memory_gb: float | None) -> int:
    """Volumes to read ahead under the memory budget (:func:`kaggle_utils.memory.plan_predict_memory`),
    logged in one line; :class:`PredictError` when the models and the largest test volume cannot fit."""
    from .memory import PredictMemoryInputs, budget_bytes, fmt_bytes, plan_predict_memory

    voxels = 0
    for rec in records:
        try:
            voxels = max(voxels, int(np.prod(mask_shape(rec.image_path))))
        except DataError:
            continue  # that volume fails on its own when it is read
    model_bytes = sum(int(p.numel()) * 4 for m in run.models for p in getattr(m, "parameters", lambda: [])())
    x = PredictMemoryInputs(n_models=len(run.models), model_bytes=model_bytes, voxels=voxels, prefetch=run.prefetch,
                            on_gpu=str(run.device).startswith("cuda"))
    budget, source = budget_bytes(machine, override_gb=memory_gb)
    depth, costs, problem = plan_predict_memory(x, budget, source)
    if problem is not None:
        raise PredictError(problem)
    log.info("predict memory: %s; %s of a %s budget (%s)", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in costs.items()),
             fmt_bytes(sum(costs.values())), fmt_bytes(budget), source)
    if depth < run.prefetch:
        run.note(f"memory: no room to read the next volume ahead ({fmt_bytes(budget)} budget); reading in turn")
    return depth


def _check_sources(checkpoints: Any, models: Any, data_dir: Any) -> None:
    """:class:`PredictError` unless exactly one of ``checkpoints``/``models`` and a ``data_dir`` are given."""
    if (checkpoints is None) == (models is None):
        raise PredictError("predict_dataset: pass exactly one of checkpoints= or models=")
    if data_dir is None:
        raise PredictError("predict_dataset: data_dir is required")


def _new_run(checkpoints: Any, models: Any, normalization: str | None, device: str, inference_cfg: Any,
             postprocess_cfg: Any, tta: Any, out_zip: Path, save_probs: str | os.PathLike | None,
             n_volumes: int) -> _Run:
    """Load the models and settings (:func:`_setup`) into a fresh :class:`_Run` staging in ``<out_zip>.parts/``."""
    from .version import version_stamp

    model_list, norm, fold, settings, pp_cfg, tta = _setup(checkpoints, models, normalization, device,
                                                           inference_cfg, postprocess_cfg, tta)
    log.info("predict: kaggle_utils %s, %d model(s) on %s, %d test volume(s)", version_stamp(), len(model_list),
             device, n_volumes)
    probs_dir = Path(save_probs) if save_probs is not None else None
    return _Run(model_list, settings, tta, norm, pp_cfg, device, fold, staging_dir(out_zip), probs_dir,
                PredictReport(out_zip=out_zip, tta=tta, device=device))


def _stage_reusable(run: _Run, index: Any, out_zip: Path) -> list:
    """Remove stale temp files, adopt the staged masks an identical earlier run left; the records still to predict."""
    probs_dir = run.probs_dir
    _remove_stale_temp_files(out_zip, [run.parts] + ([probs_dir] if probs_dir is not None else []))
    fingerprint = _run_fingerprint(run.models, run.normalization, {**run.settings.to_kwargs(), "tta": run.tta},
                                   run.pp_cfg)
    run.staged = _reusable_parts(run.parts, index, fingerprint)
    _note_reused(run)
    return [rec for rec in index.records if rec.id not in run.staged]


def _predict_todo(run: _Run, todo: list, time_limit_s: float, t_start: float, progress: bool) -> None:
    """:func:`_predict_all`; the staging folder is removed (when it holds nothing of an earlier run) before
    re-raising :class:`MissingCodecError` or raising :class:`PredictFailed` when every volume failed."""
    try:
        _predict_all(run, todo, time_limit_s, t_start, progress)
    except MissingCodecError:
        if not run.staged:
            shutil.rmtree(run.parts, ignore_errors=True)
        raise
    if todo and len(run.report.errors) == len(todo) and not run.staged:
        shutil.rmtree(run.parts, ignore_errors=True)
        raise _nothing_predicted(run, len(todo))


def _note_reused(run: _Run) -> None:
    if not run.staged:
        return
    run.report.reused = list(run.staged)
    msg = (f"reusing {len(run.staged)} staged mask(s) of an earlier run from {run.parts} (not predicted again): "
           + ", ".join(list(run.staged)[:10]) + (" ..." if len(run.staged) > 10 else ""))
    run.report.notes.append(msg)
    log.info(msg)
    for vid in run.staged:
        run.report.volumes.append({"id": vid, "shape": None, "seconds": 0.0, "fg_fraction": None,
                                   "tta_passes": None, "error": None, "reused": True})


# ----------------------------------------------------------------------------------------------
# Helpers: TTA planning, configs, prefetching, staging
# ----------------------------------------------------------------------------------------------


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


def _normalization_of(cfgs: list[dict], checkpoints: Sequence) -> str:
    modes = {}
    for path, cfg in zip(checkpoints, cfgs):
        mode = ((cfg.get("sampler") or {}).get("normalization")) or "zscore"
        modes[str(path)] = mode
    distinct = set(modes.values())
    if len(distinct) > 1:
        raise PredictError(
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


def _build_postprocess_cfg(postprocess_cfg: Any, cfgs: list[dict]):
    from .config import from_dict
    from .postprocess import PostprocessConfig

    if isinstance(postprocess_cfg, PostprocessConfig):
        return postprocess_cfg
    if isinstance(postprocess_cfg, dict):
        return from_dict(PostprocessConfig, postprocess_cfg, "postprocess")
    section = (cfgs[0].get("postprocess") if cfgs else None) or {}
    return from_dict(PostprocessConfig, section, "postprocess")


def _prefetch(records: Sequence, load: Callable[[Any], Any], depth: int = 1
              ) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Yield ``(record, load(record), error)``; the next ``depth`` records load in a background thread
    (:class:`~kaggle_utils.inference.VolumePrefetcher`; ``depth`` 0: in turn, no thread). A failing load
    is yielded as its error instead of ending the iteration."""
    from .inference import VolumePrefetcher

    def safe(i: int):
        try:
            return load(records[i]), None
        except Exception as exc:  # reported per volume, never kills the run
            return None, exc

    if depth < 1:
        for i in range(len(records)):
            loaded, err = safe(i)
            yield records[i], loaded, err
        return
    prefetcher = VolumePrefetcher(safe, range(len(records)), depth=depth)
    try:
        for i, (loaded, err) in prefetcher:
            yield records[i], loaded, err
    finally:
        prefetcher.close()


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
        shape = mask_shape(image_path)
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
