"""Tune post-processing on out-of-fold probabilities with the local competition scorer.

The winners of the competition gained about +0.03 from post-processing and still chose their
threshold from a single public volume. This module chooses the :class:`PostprocessConfig` that
maximizes the **mean local competition score** (:func:`kaggle_utils.metrics.score_volume`) over
out-of-fold probability volumes instead, and reports how much of that gain survives on held-out
folds.

Pipeline:

1. :func:`load_probs` reads a folder of probability volumes: ``{id}.npz`` (compact ``uint8`` codes)
   or ``{id}.npy`` (``float16 (Z, Y, X)``), through :func:`kaggle_utils.probs.read_probs`, each
   with an ``{id}.json`` sidecar (``id, scroll_id, fold, shape, dtype``) — the format written by
   ``train`` (``RUN_DIR/oof/``, ``RUN_DIR/fold{k}/oof/`` for all folds) and by
   ``predict --save-probs DIR``. Sub-folders are searched, so one call reads every fold.
2. :func:`load_labels` reads the matching ``train_labels/{id}.tif``.
3. :func:`tune` searches a :class:`SearchSpace`: a grid over the threshold (and, optionally, the
   hysteresis low threshold, with the threshold as the high one), then coordinate descent over
   dust size, closing radius, pinhole filling, cavity filling, border zeroing, the winners' steps
   (per-sheet patching, 2x2x2 plug, z-pruning, directional closings, opening, ridge filter,
   skeleton re-thickening, multi-level split: each searched only when its list in the space
   has two or more values; :data:`WINNERS_SPACE` switches them all on) and the threshold again
   (``method="random"``: random search instead; ``method="halving"``: successive halving over
   the threshold grid plus random combinations — all on a few volumes, the best third on three
   times as many, ... until the survivors are scored on every volume, see
   :func:`halving_schedule`; ``method="exhaustive"``: that pool on every volume). Every
   (candidate, volume) pair is one task in a process pool, submitted volume by volume; the
   volumes reach the workers once (fork: shared memory; spawn: pickled once per worker by the
   pool initializer), never once per candidate.
4. :class:`TuneResult` holds the best config, every evaluated candidate with its mean score and
   three parts, per-scroll means, and the **fold guard**: for each fold, the candidate chosen on
   the other folds, scored on the held-out one, next to the in-sample best's score there.
   :func:`plot_threshold_curves` draws score and parts against the threshold, overall and per
   scroll.

The best config is written with :func:`kaggle_utils.postprocess.save_postprocess`, so
``predict --postprocess best-postprocess.yaml`` reads it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Sequence

import numpy as np

from .config import ConfigError, deep_merge, from_dict, load_config
from .data import DataError
from .postprocess import KNOB_RULES, PostprocessConfig, check_knob, postprocess
from .probs import as_probability, find_prob_files, read_probs

__all__ = [
    "ProbVolume",
    "SearchSpace",
    "CandidateResult",
    "FoldGuardRow",
    "TuneResult",
    "load_probs",
    "load_labels",
    "load_search_space",
    "WINNERS_SPACE",
    "halving_schedule",
    "tune",
    "plot_threshold_curves",
]

log = logging.getLogger(__name__)

PARTS = ("score", "topo_score", "surface_dice", "voi_score")
#: parameters visited by coordinate descent, in this order (the threshold last: it interacts with all)
#: parameters visited by coordinate descent, in this order (the threshold last: it interacts with all)
BASIC_COORDINATES = ("min_component_size", "closing_radius", "fill_pinholes", "max_cavity_size", "border")
#: the winners' post-processing steps (``postprocess.py``); searched only where the space lists
#: two or more values, so the default space searches exactly what it did before they existed
WINNER_COORDINATES = ("sheets", "sheet_closing", "sheet_max_hole", "hole_plug", "z_prune", "closing_z", "closing_xy",
                      "opening_radius", "ridge_sigma", "skeleton_radius", "skeleton_threshold", "split_levels")
COORDINATES = BASIC_COORDINATES + WINNER_COORDINATES + ("threshold",)
_FLOAT_KEYS = ("threshold", "hysteresis_low", "ridge_sigma", "skeleton_radius")


# ----------------------------------------------------------------------------------------------
# Probability volumes
# ----------------------------------------------------------------------------------------------


@dataclass
class ProbVolume:
    """One out-of-fold probability volume.

    Attributes:
        id: volume id (the ``train.csv`` id).
        scroll_id: its scroll.
        fold: the fold it was held out in (``None`` when unknown, e.g. ``predict --save-probs``
            with an ensemble of several folds).
        prob: ``(Z, Y, X)`` foreground probabilities as stored: ``uint8`` codes ``round(p * 255)``
            (the compact format), or ``float16``/``float32`` in ``[0, 1]``.
        path: the file it came from (``None`` when built in memory).
    """

    id: str
    scroll_id: str
    fold: int | None
    prob: np.ndarray
    path: Path | None = None

    def probability(self) -> np.ndarray:
        """``float32 (Z, Y, X)`` probabilities (:func:`kaggle_utils.probs.as_probability`)."""
        return as_probability(self.prob)


def _as_fold(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None  # None, or a list of folds (an ensemble): no single held-out fold


def load_probs(folder: str | os.PathLike, mmap: bool = False) -> list[ProbVolume]:
    """Read every probability file (``{id}.npz`` compact or ``{id}.npy`` float16) with its ``{id}.json``
    under ``folder`` (sub-folders included), through :func:`kaggle_utils.probs.read_probs`.

    Args:
        folder: a folder written by ``train`` (``RUN_DIR/oof``; ``RUN_DIR`` of ``--fold -1``
            holds one ``fold{k}/oof`` per fold) or by ``predict --save-probs``.
        mmap: memory-map ``.npy`` arrays instead of reading them (saves memory for large sets).

    Returns:
        The volumes, sorted by id, ``prob`` as stored (``uint8`` codes or ``float16 (Z, Y, X)``;
        :meth:`ProbVolume.probability` gives ``float32``).

    Raises:
        DataError: no probability files, a file without its sidecar, a sidecar without
            ``scroll_id``, a shape mismatch, or the same id twice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: probability folder not found")
    files = find_prob_files(folder)
    if not files:
        raise DataError(f"{folder}: no {{id}}.npz / {{id}}.npy probability files found (looked in sub-folders too)")
    out: dict[str, ProbVolume] = {}
    for path in files:
        meta = _read_sidecar(path)
        vid = str(meta.get("id", path.stem))
        prob = read_probs(path, mmap=mmap)
        if prob.ndim != 3:
            raise DataError(f"{path}: expected a 3D (Z, Y, X) array, got shape {prob.shape}")
        if "shape" in meta and list(meta["shape"]) != list(prob.shape):
            raise DataError(f"{path}: shape {list(prob.shape)} differs from {path.stem}.json shape {meta['shape']}")
        if vid in out:
            raise DataError(f"{path}: id {vid!r} also in {out[vid].path}; pass one run's probabilities")
        out[vid] = ProbVolume(vid, str(meta["scroll_id"]), _as_fold(meta.get("fold")), prob, path)
    return [out[k] for k in sorted(out)]


def _read_sidecar(path: Path) -> dict:
    """The ``{id}.json`` beside a probability file (must hold ``scroll_id``)."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise DataError(f"{path}: sidecar {sidecar.name} (id, scroll_id, fold) not found")
    try:
        meta = json.loads(sidecar.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{sidecar}: invalid JSON ({exc})") from None
    if "scroll_id" not in meta:
        raise DataError(f"{sidecar}: key 'scroll_id' missing")
    return meta


def load_labels(data_dir: str | os.PathLike, ids: Sequence[str],
                probs: Sequence[ProbVolume] | None = None) -> list[np.ndarray]:
    """Labels (``uint8 (Z, Y, X)``, values {0, 1, 2}) of ``ids`` from a competition-layout folder.

    Args:
        data_dir: competition-layout folder.
        ids: the volumes, in order.
        probs: their probabilities (same order): every label's shape is checked against them from the
            TIFF headers before any label is decoded, so a mismatch stops ``tune`` before the search.

    Raises:
        DataError: an id is not in ``train.csv`` (probabilities of test volumes have no labels); a label
            whose shape differs from its probabilities (naming both files).
    """
    from .data import check_tiff_header, load_index, read_label

    index = load_index(data_dir, "train")
    by_id = {r.id: r for r in index}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"{Path(data_dir) / 'train.csv'}: no label for id(s) {missing[:5]}"
            + (" ..." if len(missing) > 5 else "") + " (tune needs out-of-fold probabilities of train ids)"
        )
    for p in probs or ():
        shape = check_tiff_header(by_id[p.id].label_path)
        if tuple(p.prob.shape) != shape:
            raise DataError(f"{p.path or p.id}: probability shape {tuple(p.prob.shape)} != label shape {shape} of "
                            f"{by_id[p.id].label_path} (probabilities of another data set or version?)")
    return [read_label(by_id[i].label_path) for i in ids]


# ----------------------------------------------------------------------------------------------
# Search space
# ----------------------------------------------------------------------------------------------


def _frange(start: float, stop: float, step: float) -> list[float]:
    n = int(np.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 6) for i in range(max(n, 0))]


@dataclass
class SearchSpace:
    """Values :func:`tune` tries for each :class:`PostprocessConfig` field (the ``--space`` YAML).

    Every list field may be written in YAML as a list or as a range mapping
    ``{start: 0.2, stop: 0.6, step: 0.05}`` (``stop`` included). An empty list leaves the field at
    its value in ``base``.

    Args:
        threshold: thresholds of the first-stage grid (also the hysteresis high thresholds).
        hysteresis_low: low thresholds of 3D hysteresis; each is paired with every larger
            ``threshold`` in the first stage (empty: hysteresis is not searched).
        min_component_size: dust sizes (voxels, 26-connected; 0 = off).
        closing_radius: closing ball radii (0 = off).
        fill_pinholes: pinhole filling on/off (old key ``fill_holes``: read with a deprecation warning).
        max_cavity_size: largest enclosed cavity filled (0 = off).
        border: voxels zeroed on each face (0 = off).
        sheets, sheet_closing, sheet_max_hole, hole_plug, z_prune, closing_z, closing_xy,
        opening_radius, ridge_sigma, skeleton_radius, skeleton_threshold, split_levels: values of
            the :class:`PostprocessConfig` fields of the same names (the winners' steps). Empty
            (the default) leaves a field at its ``base`` value and adds no candidate;
            :data:`WINNERS_SPACE` is a space that tries each of them.
        base: starting values of the fields not yet searched.
        method: ``"coordinate"`` (coordinate descent, repeated up to ``rounds`` times until
            nothing changes), ``"random"`` (``n_random`` random combinations around the
            first-stage best threshold), ``"halving"`` (successive halving over a fixed pool:
            the threshold grid plus ``n_random`` random combinations, see
            :func:`halving_schedule`) or ``"exhaustive"`` (the same pool, every candidate on
            every volume: the reference that halving approximates).
        rounds: coordinate-descent passes at most.
        n_random: candidates of the random search (and random part of the halving pool).
        halving_eta: successive halving keeps the best ``1 / halving_eta`` of the candidates at
            each rung and gives the survivors ``halving_eta`` times as many volumes.
        halving_min_volumes: volumes of the first rung (spread over folds/scrolls).
        halving_bounds: at each rung, first compute a cheap upper bound of every new (candidate,
            volume) score (:func:`~kaggle_utils.metrics.score_bound`: exact SurfaceDice and VOI,
            TopoScore bounded without its dimension-1/2 reductions), then full scores best bound
            first, and stop once no unscored candidate's bound can reach the kept ones (the last
            rung is scored in full). The kept candidates and the answer are the same as with
            ``False`` (which scores every pair). Off by default: on out-of-fold probabilities of a
            real CPU training run (TopoScore ~0.1, m_1 far below its bound) it rejected nothing and
            cost 15 % more time (BENCHMARKS.md, "Tuning at real scale"); it can pay only where
            the bound is tight (predictions whose dimension-1 features mostly match).
    """

    threshold: list[float] = field(default_factory=lambda: _frange(0.2, 0.6, 0.05))
    hysteresis_low: list[float] = field(default_factory=list)
    min_component_size: list[int] = field(default_factory=lambda: [0, 200, 1000, 5000, 20000])
    closing_radius: list[int] = field(default_factory=lambda: [0, 1, 2])
    fill_pinholes: list[bool] = field(default_factory=lambda: [False, True])
    max_cavity_size: list[int] = field(default_factory=lambda: [0, 100, 1000])
    border: list[int] = field(default_factory=lambda: [0, 3])
    sheets: list[bool] = field(default_factory=list)
    sheet_closing: list[int] = field(default_factory=list)
    sheet_max_hole: list[int] = field(default_factory=list)
    hole_plug: list[bool] = field(default_factory=list)
    z_prune: list[bool] = field(default_factory=list)
    closing_z: list[int] = field(default_factory=list)
    closing_xy: list[int] = field(default_factory=list)
    opening_radius: list[int] = field(default_factory=list)
    ridge_sigma: list[float] = field(default_factory=list)
    skeleton_radius: list[float] = field(default_factory=list)
    skeleton_threshold: list[float | None] = field(default_factory=list)
    split_levels: list[tuple[float, ...]] = field(default_factory=list)
    base: PostprocessConfig = field(default_factory=PostprocessConfig)
    method: Literal["coordinate", "random", "halving", "exhaustive"] = "coordinate"
    rounds: int = 2
    n_random: int = 40
    halving_eta: int = 3
    halving_min_volumes: int = 2
    halving_bounds: bool = False

    #: Old key names still read (with a deprecation warning) by :func:`~kaggle_utils.config.from_dict`.
    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"fill_holes": "fill_pinholes"}

    def __post_init__(self) -> None:
        if not self.threshold:
            raise ValueError("tune.threshold: needs at least one value")
        for name in KNOB_RULES:  # the same value rules as PostprocessConfig, from the one list
            if hasattr(self, name):
                check_knob(name, getattr(self, name), f"tune.{name}")
        self.split_levels = [tuple(float(x) for x in v) for v in self.split_levels]
        for v in self.split_levels:
            if list(v) != sorted(v) or any(not 0 < x < 1 for x in v):
                raise ValueError(f"tune.split_levels: each entry must be increasing values in (0, 1), got {list(v)}")
        if self.rounds < 1 or self.n_random < 1:
            raise ValueError("tune.rounds and tune.n_random: must be >= 1")
        if self.method not in ("coordinate", "random", "halving", "exhaustive"):
            raise ValueError(f"tune.method: must be coordinate, random, halving or exhaustive, got {self.method!r}")
        if self.halving_eta < 2 or self.halving_min_volumes < 1:
            raise ValueError(f"tune.halving_eta and tune.halving_min_volumes: must be >= 2 and >= 1, got "
                             f"{self.halving_eta} and {self.halving_min_volumes}")


_RANGE_KEYS = {"start", "stop", "step"}


def _expand_ranges(data: dict, where: str) -> dict:
    out = dict(data)
    for key, value in data.items():
        if isinstance(value, dict) and key != "base":
            unknown = sorted(set(value) - _RANGE_KEYS)
            missing = sorted(_RANGE_KEYS - set(value))
            if unknown or missing:
                raise ConfigError(
                    f"{where}{key}: a range needs exactly the keys start, stop, step"
                    + (f"; unknown {unknown}" if unknown else "") + (f"; missing {missing}" if missing else "")
                )
            try:
                start, stop, step = (float(value[k]) for k in ("start", "stop", "step"))
            except (TypeError, ValueError):
                raise ConfigError(f"{where}{key}: range start/stop/step must be numbers, got {value}") from None
            if step <= 0:
                raise ConfigError(f"{where}{key}: range step must be > 0, got {step}")
            vals = _frange(start, stop, step)
            if key not in _FLOAT_KEYS:
                vals = [int(round(v)) for v in vals]
            out[key] = vals
    return out


def load_search_space(path: str | os.PathLike | None = None, data: dict | None = None,
                      overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Build a :class:`SearchSpace` from a YAML file (or a dict); ``None`` for both: the defaults.

    Accepts the bare mapping or a top-level ``tune:`` section (read by
    :func:`kaggle_utils.config.load_config`, the one loader). Unknown keys raise
    :class:`~kaggle_utils.config.ConfigError` naming the file and the ``tune.`` key.
    ``overrides`` (``tune --set``): ``{"threshold": [0.3, 0.4], "base.border": 3}`` on top (a leading
    ``tune.`` is allowed), ranges as in the file.
    """
    overrides = {k.removeprefix("tune."): v for k, v in (overrides or {}).items()}
    if path is None and data is None and not overrides:
        return SearchSpace()
    if path is not None:
        return load_config(SearchSpace, path, section="tune", overrides=overrides,
                           transform=lambda raw, prefix: _expand_ranges(raw, f"{prefix}."))
    raw = dict(data or {})
    if isinstance(raw.get("tune"), dict):
        raw = raw["tune"]
    for key, value in overrides.items():
        raw = deep_merge(raw, _nested(key, value))
    return from_dict(SearchSpace, _expand_ranges(raw, "tune."), "tune")


def _nested(key: str, value: Any) -> dict:
    """``"base.border", 3`` -> ``{"base": {"border": 3}}``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


#: A search space that tries each of the winners' post-processing steps (``load_search_space(data=
#: WINNERS_SPACE)``, or the same keys in a ``--space`` YAML): the basic grid and coordinates as in
#: the default space, and each new step off/on with the sizes the winners used around it.
WINNERS_SPACE: dict[str, Any] = {
    "sheets": [False, True],
    "sheet_closing": [1, 3],
    "sheet_max_hole": [256, 4096],
    "hole_plug": [False, True],
    "z_prune": [False, True],
    "closing_z": [0, 1, 2],
    "closing_xy": [0, 1],
    "opening_radius": [0, 1],
    "ridge_sigma": [0.0, 1.0, 1.5],
    "skeleton_radius": [0.0, 1.5],
    "split_levels": [[], [0.6, 0.7, 0.8]],
}


# ----------------------------------------------------------------------------------------------
# Evaluation (in worker processes)
# ----------------------------------------------------------------------------------------------


def _key(cfg: PostprocessConfig) -> tuple:
    return dataclasses.astuple(cfg)


class _Evaluator:
    """Holds the volumes of one tuning run; scores (candidate, volume) pairs.

    A worker keeps one instance (set once by the pool initializer), a cache keyed by the binary
    mask that reaches the scorer, so candidates that give the same mask are scored once, and an
    :class:`~kaggle_utils.metrics.topo.OctantCache`, so a mask that differs from an earlier one only
    in some octants has only those octants' Betti matching computed (the rest of the score is
    recomputed: SurfaceDice and VOI are cheap beside it).
    """

    def __init__(self, probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], octant_cache: bool = True):
        from .metrics.topo import OctantCache

        self.probs = probs
        self.labels = labels
        self.cache: dict[tuple[int, bytes], tuple[float, float, float, float]] = {}
        self.topo_cache = OctantCache() if octant_cache else None
        self._f32: tuple[int, np.ndarray] | None = None  # the last volume as float32 (tasks come volume by volume)
        self._gt: dict[int, Any] = {}  # GroundTruthCache of the last two volumes scored

    def _gt_cache(self, i: int) -> Any:
        """The :class:`~kaggle_utils.metrics.GroundTruthCache` of volume ``i`` (the last two kept)."""
        from .metrics import GroundTruthCache

        if i not in self._gt:
            while len(self._gt) >= 2:
                del self._gt[next(iter(self._gt))]
            self._gt[i] = GroundTruthCache()
        return self._gt[i]

    def _mask(self, cfg: PostprocessConfig, i: int) -> tuple[np.ndarray, bytes]:
        """The ``bool (Z, Y, X)`` mask that reaches the scorer (ignore voxels zeroed) and its digest."""
        import hashlib

        # float32 as in predict, which thresholds the float32 probabilities before they are saved
        if self._f32 is None or self._f32[0] != i:
            self._f32 = (i, as_probability(self.probs[i]))
        mask = postprocess(self._f32[1], cfg)
        mask[self.labels[i] == 2] = 0  # the scorer ignores these voxels; doing it here makes the cache key exact
        return mask, hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).digest()

    def __call__(self, cfg: PostprocessConfig, i: int, reuse: Any = None) -> tuple:
        """``(score parts, postprocess s, score s, cache counters)`` of candidate ``cfg`` on volume ``i``;
        ``reuse``: its :class:`~kaggle_utils.metrics.ScoreBound` (SurfaceDice and VOI not recomputed)."""
        from .metrics import score_volume

        t0 = time.perf_counter()
        mask, digest = self._mask(cfg, i)
        t1 = time.perf_counter()
        hit = self.cache.get((i, digest))
        counts = {"masks_reused": int(hit is not None), "octants_reused": 0, "octants_scored": 0}
        if hit is None:
            tc = self.topo_cache
            before = (tc.hits, tc.misses) if tc is not None else (0, 0)
            s = score_volume(mask, self.labels[i], topo_cache=tc, reuse=reuse, gt_cache=self._gt_cache(i))
            hit = (s.score, s.topo_score, s.surface_dice, s.voi_score)
            self.cache[(i, digest)] = hit
            if tc is not None:
                counts["octants_reused"], counts["octants_scored"] = tc.hits - before[0], tc.misses - before[1]
            else:
                counts["octants_scored"] = 8
        return hit, t1 - t0, time.perf_counter() - t1, counts

    def bound(self, cfg: PostprocessConfig, i: int) -> tuple:
        """``(parts, postprocess s, score s, cache counters, bound)``: the exact parts when this mask was
        scored before (``bound`` None), else the upper bound ``(upper, topo_upper, SD, VOI)`` and its
        :class:`~kaggle_utils.metrics.ScoreBound` (``bound``), for the runner to pass back as ``reuse``."""
        from .metrics import score_bound

        t0 = time.perf_counter()
        mask, digest = self._mask(cfg, i)
        t1 = time.perf_counter()
        hit = self.cache.get((i, digest))
        counts = {"masks_reused": int(hit is not None), "octants_reused": 0, "octants_scored": 0, "pairs_bounded": 0}
        if hit is not None:
            return hit, t1 - t0, time.perf_counter() - t1, counts, None
        b = score_bound(mask, self.labels[i], topo_cache=self.topo_cache, gt_cache=self._gt_cache(i))
        counts["pairs_bounded"] = 1
        return (b.upper, b.topo_upper, b.surface_dice, b.voi_score), t1 - t0, time.perf_counter() - t1, counts, b


_WORKER: _Evaluator | None = None  # one per worker process, set by _init_worker


def _init_worker(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], octant_cache: bool) -> None:
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = _Evaluator(probs, labels, octant_cache)


def _work(cfgs: Sequence[PostprocessConfig], i: int, reuses: Sequence[Any] | None = None) -> list:
    """A chunk of candidates on volume ``i`` in one worker (its caches see them all); ``reuses``:
    ``None`` for upper bounds (:meth:`_Evaluator.bound`), else one ``ScoreBound`` or ``None`` per
    candidate for full scores."""
    assert _WORKER is not None, "worker not initialized"  # internal invariant, not user input
    if reuses is None:
        return [_WORKER.bound(cfg, i) for cfg in cfgs]
    return [_WORKER(cfg, i, r) for cfg, r in zip(cfgs, reuses)]


def _chunks(todo: Sequence[tuple[int, int]], workers: int) -> list[tuple[list[int], int]]:
    """Group (candidate, volume) pairs into ``(candidates, volume)`` chunks: a volume's candidates stay
    together (its float32 copy, mask cache and octant cache are in one worker) unless there are too few
    volumes to keep ``workers`` busy, then each volume's list is cut into about ``2 * workers / volumes``
    runs of neighbouring candidates."""
    by_vol: dict[int, list[int]] = {}
    for j, i in todo:
        by_vol.setdefault(i, []).append(j)
    parts = max(1, math.ceil(2 * workers / len(by_vol))) if workers > 1 and by_vol else 1
    out = []
    for i, js in by_vol.items():
        size = math.ceil(len(js) / min(parts, len(js)))
        out += [(js[k:k + size], i) for k in range(0, len(js), size)]
    return out


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class CandidateResult:
    """One evaluated candidate: its config, the search stage, and means over all volumes."""

    cfg: PostprocessConfig
    stage: str
    score: float
    topo_score: float
    surface_dice: float
    voi_score: float


@dataclass
class FoldGuardRow:
    """Over-fitting guard for one fold.

    Attributes:
        fold: the held-out fold.
        n_volumes: volumes in it.
        chosen: the best candidate on the *other* folds.
        held_out_score: ``chosen``'s mean score on this fold (an honest estimate).
        in_sample_score: the overall best config's mean score on this fold (chosen with it).
        oracle_score: the best any evaluated candidate reaches on this fold.
    """

    fold: int | str
    n_volumes: int
    chosen: PostprocessConfig
    held_out_score: float
    in_sample_score: float
    oracle_score: float


@dataclass
class TuneResult:
    """Everything :func:`tune` measured.

    Attributes:
        best: the best :class:`PostprocessConfig` (mean score over all volumes).
        best_score: its mean score.
        candidates: every evaluated candidate, in evaluation order.
        scores: ``float64 (n_candidates, n_volumes, 4)`` per-volume ``score, topo_score,
            surface_dice, voi_score``.
        ids, scroll_ids, folds: per volume.
        per_scroll: ``{scroll_id: {part: mean}}`` of ``best``.
        fold_guard: one :class:`FoldGuardRow` per fold (empty with fewer than 2 folds).
        fold_source: ``"sidecar"`` (folds from the probability files) or ``"scroll_id"``
            (folds unknown: one fold per scroll).
        timings: seconds of ``postprocess`` and ``score`` summed over tasks (across workers),
            and ``wall`` of the search.
        n_tasks: (candidate, volume) pairs evaluated.
        cache: ``masks_reused`` (pairs whose final mask had been scored before), ``octants_reused``
            / ``octants_scored`` (TopoScore octants taken from the octant cache / computed),
            ``pairs_bounded`` (pairs given an upper bound by halving; ``n_tasks`` counts only the
            pairs scored in full).
    """

    best: PostprocessConfig
    best_score: float
    candidates: list[CandidateResult]
    scores: np.ndarray
    ids: list[str]
    scroll_ids: list[str]
    folds: list[int | str | None]
    per_scroll: dict[str, dict[str, float]]
    fold_guard: list[FoldGuardRow]
    fold_source: str
    timings: dict[str, float]
    n_tasks: int
    cache: dict[str, int] = field(default_factory=dict)

    def _index(self, cfg: PostprocessConfig) -> int | None:
        k = _key(cfg)
        for j, c in enumerate(self.candidates):
            if _key(c.cfg) == k:
                return j
        return None

    def threshold_curve(self, scroll_id: str | None = None, cfg: PostprocessConfig | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Score parts against the threshold with every other field as in ``cfg`` (default: best).

        Returns:
            ``(thresholds float (T,), parts float (T, 4))`` for the evaluated thresholds, means over
            all volumes or over those of ``scroll_id``.
        """
        cfg = cfg or self.best
        rows = []
        vol = np.ones(len(self.ids), bool) if scroll_id is None else np.array([s == scroll_id for s in self.scroll_ids])
        for j, c in enumerate(self.candidates):
            if _key(_with_threshold(c.cfg, cfg.threshold)) == _key(cfg):
                rows.append((c.cfg.threshold, self.scores[j][vol].mean(axis=0)))
        rows.sort(key=lambda r: r[0])
        if not rows:
            return np.zeros(0), np.zeros((0, 4))
        return np.array([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def format_table(self, top: int | None = 15) -> str:
        """The candidates sorted by mean score, per-scroll means and the fold guard, as text."""
        lines = [f"{'rank':>4} {'score':>7} {'topo':>7} {'SD':>7} {'VOI':>7}  {'stage':<20} config"]
        order = sorted(range(len(self.candidates)), key=lambda j: -self.candidates[j].score)
        for r, j in enumerate(order[:top] if top else order, 1):
            c = self.candidates[j]
            lines.append(f"{r:>4} {c.score:7.4f} {c.topo_score:7.4f} {c.surface_dice:7.4f} {c.voi_score:7.4f}  "
                         f"{c.stage:<20} {c.cfg.summary()}")
        if top and len(order) > top:
            lines.append(f"     ... {len(order) - top} more candidate(s)")
        lines.append("")
        lines.append(f"best: {self.best_score:.4f}  {self.best.summary()}")
        lines.append(f"{'scroll':>10} {'n':>4} {'score':>7} {'topo':>7} {'SD':>7} {'VOI':>7}")
        for s, d in self.per_scroll.items():
            n = sum(x == s for x in self.scroll_ids)
            lines.append(f"{s:>10} {n:>4} " + " ".join(f"{d[p]:7.4f}" for p in PARTS))
        if self.fold_guard:
            lines.append("")
            lines.append(f"fold guard (folds from {self.fold_source}): parameters chosen on the other folds, "
                         "scored on the held-out one")
            lines.append(f"{'fold':>6} {'n':>4} {'held-out':>9} {'in-sample':>9} {'oracle':>7}  chosen on other folds")
            for g in self.fold_guard:
                lines.append(f"{g.fold!s:>6} {g.n_volumes:>4} {g.held_out_score:9.4f} {g.in_sample_score:9.4f} "
                             f"{g.oracle_score:7.4f}  {g.chosen.summary()}")
            ho = _weighted_mean([(g.held_out_score, g.n_volumes) for g in self.fold_guard])
            ins = _weighted_mean([(g.in_sample_score, g.n_volumes) for g in self.fold_guard])
            lines.append(f"{'all':>6} {len(self.ids):>4} {ho:9.4f} {ins:9.4f}")
        if self.timings:
            lines.append("")
            lines.append(self.cost_line())
        return "\n".join(lines)

    def cost_line(self) -> str:
        """One line: pairs scored, wall and worker seconds, and what the two caches saved."""
        t, c = self.timings, self.cache
        oct_total = c.get("octants_reused", 0) + c.get("octants_scored", 0)
        line = (f"cost: {self.n_tasks} (candidate, volume) pairs in {t.get('wall', 0.0):.1f} s wall; worker time "
                f"post-processing {t.get('postprocess', 0.0):.1f} s, scoring {t.get('score', 0.0):.1f} s")
        if c:
            line += (f"; {c.get('masks_reused', 0)} pair(s) reused an identical mask's score, "
                     f"{c.get('octants_reused', 0)} of {oct_total} TopoScore octants came from the octant cache")
        return line

    def to_json(self) -> dict:
        """Plain-JSON summary (no per-volume matrix)."""
        return {
            "best": dataclasses.asdict(self.best),
            "best_score": self.best_score,
            "per_scroll": self.per_scroll,
            "fold_source": self.fold_source,
            "fold_guard": [{**dataclasses.asdict(g), "chosen": dataclasses.asdict(g.chosen)} for g in self.fold_guard],
            "candidates": [{**dataclasses.asdict(c), "cfg": dataclasses.asdict(c.cfg)} for c in self.candidates],
            "timings": self.timings,
            "cache": self.cache,
            "n_tasks": self.n_tasks,
        }


def _weighted_mean(pairs: Iterable[tuple[float, int]]) -> float:
    pairs = list(pairs)
    n = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / n) if n else float("nan")


def _with_threshold(cfg: PostprocessConfig, t: float, low: float | None | Literal["keep"] = "keep") -> PostprocessConfig:
    """``cfg`` with threshold ``t``; with hysteresis, ``t`` is also the high threshold."""
    low = cfg.hysteresis_low if low == "keep" else low
    if low is not None and low > t:
        low = None
    return dataclasses.replace(cfg, threshold=float(t), hysteresis_low=low, hysteresis_high=None if low is None else float(t))


# ----------------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------------


class _Runner:
    """Evaluates batches of candidates on all volumes, in a pool or in this process, with a cache."""

    def __init__(self, probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], workers: int, progress: bool,
                 octant_cache: bool = True):
        from .progress import progress_bar

        self.n = len(probs)
        self.workers = workers
        self.cfgs: list[PostprocessConfig] = []
        self.stages: list[str] = []
        self.rows: list[np.ndarray] = []
        self.index: dict[tuple, int] = {}
        self.timings = {"postprocess": 0.0, "score": 0.0}
        self.cache_counts = {"masks_reused": 0, "octants_reused": 0, "octants_scored": 0, "pairs_bounded": 0}
        self.upper: list[np.ndarray] = []  # per candidate: ``float (n,)`` score upper bounds (NaN: none)
        self.bounds: dict[tuple[int, int], Any] = {}  # (candidate, volume) -> ScoreBound, reused when scored
        self.pool = None
        self.local = None
        if workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else None)
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(list(probs), list(labels), octant_cache))
        else:
            self.local = _Evaluator(probs, labels, octant_cache)
        self.bar = progress_bar(total=0, desc="tune", unit="vol", enabled=progress)

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.shutdown()

    def mean(self, cfg: PostprocessConfig, vols: Sequence[int] | None = None) -> float:
        row = self.rows[self.index[_key(cfg)]]
        return float(row[:, 0].mean() if vols is None else row[list(vols), 0].mean())

    @property
    def n_pairs(self) -> int:
        """(candidate, volume) pairs scored so far."""
        return int(sum(np.isfinite(r[:, 0]).sum() for r in self.rows))

    def evaluate(self, cfgs: Iterable[PostprocessConfig], stage: str, vols: Sequence[int] | None = None
                 ) -> list[float]:
        """Mean score of each config over ``vols`` (default: all volumes); missing pairs are
        evaluated (in parallel, volume by volume so a worker reuses its float32 copy)."""
        cfgs = list(cfgs)
        vols = list(range(self.n)) if vols is None else list(vols)
        todo = self._missing(cfgs, stage, vols, bound=False)
        if todo:
            self._run(todo, stage, bound=False)
        return [self.mean(c, vols) for c in cfgs]

    def _missing(self, cfgs: Sequence[PostprocessConfig], stage: str, vols: Sequence[int], bound: bool
                 ) -> list[tuple[int, int]]:
        """Register new candidates; the (candidate, volume) pairs without a score (``bound``: and
        without an upper bound), volume by volume."""
        for c in cfgs:
            if _key(c) not in self.index:
                self.index[_key(c)] = len(self.cfgs)
                self.cfgs.append(c)
                self.stages.append(stage)
                self.rows.append(np.full((self.n, 4), np.nan))
                self.upper.append(np.full(self.n, np.nan))
        todo: list[tuple[int, int]] = []
        seen = set()
        for i in vols:
            for c in cfgs:
                j = self.index[_key(c)]
                if np.isnan(self.rows[j][i, 0]) and not (bound and np.isfinite(self.upper[j][i])) and (j, i) not in seen:
                    seen.add((j, i))
                    todo.append((j, i))
        return todo

    def _run(self, todo: Sequence[tuple[int, int]], stage: str, bound: bool) -> None:
        """Score (or bound) the pairs, in the pool or here."""
        self.bar.total += len(todo)
        self.bar.refresh()
        self.bar.set_postfix_str(stage + (" (bounds)" if bound else ""))
        if self.pool is not None:
            from concurrent.futures import as_completed

            futs = {self.pool.submit(_work, [self.cfgs[j] for j in js], i,
                                     None if bound else [self.bounds.get((j, i)) for j in js]): (js, i)
                    for js, i in _chunks(todo, self.workers)}
            for f in as_completed(futs):
                js, i = futs[f]
                for j, out in zip(js, f.result()):
                    self._store(j, i, out)
        else:
            for j, i in todo:
                out = (self.local.bound(self.cfgs[j], i) if bound  # type: ignore[union-attr]
                       else self.local(self.cfgs[j], i, self.bounds.get((j, i))))  # type: ignore[misc]
                self._store(j, i, out)

    def _store(self, j: int, i: int, out) -> None:
        parts, t_pp, t_score, counts = out[:4]
        if len(out) == 5 and out[4] is not None:  # an upper bound
            self.upper[j][i] = parts[0]
            self.bounds[(j, i)] = out[4]
        else:
            self.rows[j][i] = parts
            self.upper[j][i] = parts[0]
            self.bounds.pop((j, i), None)
        self.timings["postprocess"] += t_pp
        self.timings["score"] += t_score
        for k, v in counts.items():
            self.cache_counts[k] += v
        self.bar.update(1)

    def select(self, cfgs: Sequence[PostprocessConfig], stage: str, vols: Sequence[int], keep: int
               ) -> tuple[list[PostprocessConfig], list[float]]:
        """The ``keep`` best of ``cfgs`` by mean score over ``vols`` (ties: the earlier in ``cfgs``), with
        their means, scoring as few pairs as the upper bounds allow.

        Every missing pair is bounded first; then candidates are scored on all of ``vols``, highest mean
        bound first, until ``keep`` are scored and no unscored candidate's mean bound reaches the
        ``keep``-th scored mean. The others are provably below it, so the answer is the one of scoring
        everything (:meth:`evaluate`)."""
        cfgs = list(cfgs)
        vols = list(vols)
        todo = self._missing(cfgs, stage, vols, bound=True)
        if todo:
            self._run(todo, stage, bound=True)
        rows = [self.index[_key(c)] for c in cfgs]

        def scored(a: int) -> bool:
            return bool(np.isfinite(self.rows[rows[a]][vols, 0]).all())

        def upper(a: int) -> float:
            return float(self.upper[rows[a]][vols].mean())

        by_bound = sorted(range(len(cfgs)), key=lambda a: -upper(a))  # stable: ties keep pool order
        while True:
            done = [a for a in range(len(cfgs)) if scored(a)]
            rest = [a for a in by_bound if not scored(a)]
            if not rest:
                break
            if len(done) >= keep:
                kth = sorted((self.mean(cfgs[a], vols) for a in done), reverse=True)[keep - 1]
                if upper(rest[0]) < kth - 1e-9:
                    break
            batch = rest[:max(keep - len(done), self.workers)]
            self.evaluate([cfgs[a] for a in batch], stage, vols)
        means = {a: self.mean(cfgs[a], vols) for a in done}
        rank = sorted(done, key=lambda a: -means[a])  # ``done`` is in pool order: ties keep it
        kept = sorted(rank[:keep])
        return [cfgs[a] for a in kept], [means[a] for a in kept]


def _best_of(cfgs: Sequence[PostprocessConfig], means: Sequence[float], current: PostprocessConfig | None = None,
             current_score: float = -np.inf) -> tuple[PostprocessConfig, float]:
    """Highest mean; ties keep ``current`` (then the earliest)."""
    best, best_s = current, current_score
    for c, s in zip(cfgs, means):
        if s > best_s + 1e-12:
            best, best_s = c, s
    return best, best_s  # type: ignore[return-value]


def _values(space: SearchSpace, name: str, cur: PostprocessConfig) -> list:
    vals = list(getattr(space, name))
    if getattr(cur, name) not in vals:
        vals.insert(0, getattr(cur, name))
    return vals


def _first_stage(space: SearchSpace) -> list[PostprocessConfig]:
    base = dataclasses.replace(space.base, hysteresis_low=None, hysteresis_high=None)
    cfgs = [_with_threshold(base, t, None) for t in space.threshold]
    for low in space.hysteresis_low:
        cfgs += [_with_threshold(base, t, low) for t in space.threshold if t > low]
    return cfgs


def _coordinate_descent(run: _Runner, space: SearchSpace, best: PostprocessConfig, best_s: float):
    lows: list[float | None] = [None] + list(space.hysteresis_low)
    for rnd in range(space.rounds):
        changed = False
        for name in COORDINATES:
            if name == "threshold":
                cfgs = [_with_threshold(best, t, low) for t in space.threshold for low in lows
                        if low is None or low < t]
            else:
                vals = _values(space, name, best)
                if len(vals) < 2:
                    continue
                cfgs = [dataclasses.replace(best, **{name: v}) for v in vals]
            means = run.evaluate(cfgs, f"{name} r{rnd + 1}")
            new, new_s = _best_of(cfgs, means, best, best_s)
            if _key(new) != _key(best):
                changed = True
                best, best_s = new, new_s
        if not changed:
            break
    return best, best_s


def _random_search(run: _Runner, space: SearchSpace, best: PostprocessConfig, best_s: float, seed: int):
    rng = random.Random(seed)
    lows: list[float | None] = [None] + list(space.hysteresis_low)
    cfgs = []
    for _ in range(space.n_random):
        kw = {name: rng.choice(_values(space, name, best)) for name in BASIC_COORDINATES}
        for name in WINNER_COORDINATES:  # only where searched: the default space draws as before
            vals = _values(space, name, best)
            if len(vals) > 1:
                kw[name] = rng.choice(vals)
        c = dataclasses.replace(best, **kw)
        t = rng.choice(space.threshold)
        low = rng.choice([x for x in lows if x is None or x < t])
        cfgs.append(_with_threshold(c, t, low))
    means = run.evaluate(cfgs, "random")
    return _best_of(cfgs, means, best, best_s)


def _pool(space: SearchSpace, seed: int) -> list[PostprocessConfig]:
    """Candidates of ``halving``/``exhaustive``: the threshold grid, then ``n_random`` random combinations.

    A random combination draws every searched field (two or more values) and the threshold
    (with a hysteresis low, when the space has any) around ``space.base``; duplicates are dropped.
    """
    rng = random.Random(seed)
    lows: list[float | None] = [None] + list(space.hysteresis_low)
    out = {_key(c): c for c in _first_stage(space)}
    names = [n for n in BASIC_COORDINATES + WINNER_COORDINATES if len(_values(space, n, space.base)) > 1]
    for _ in range(space.n_random):
        c = dataclasses.replace(space.base, **{n: rng.choice(_values(space, n, space.base)) for n in names})
        t = rng.choice(space.threshold)
        c = _with_threshold(c, t, rng.choice([x for x in lows if x is None or x < t]))
        out.setdefault(_key(c), c)
    return list(out.values())


def _volume_order(groups: Sequence[Any], seed: int) -> list[int]:
    """Volume indices shuffled (``seed``) and interleaved across ``groups`` (folds or scrolls),
    so the first rungs of successive halving see every group."""
    rng = random.Random(seed)
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(str(g), []).append(i)
    lists = [by[k] for k in sorted(by)]
    for lst in lists:
        rng.shuffle(lst)
    rng.shuffle(lists)
    order = []
    for k in range(max(len(x) for x in lists)):
        order += [x[k] for x in lists if k < len(x)]
    return order


def halving_schedule(n_candidates: int, n_volumes: int, eta: int = 3, min_volumes: int = 2) -> list[tuple[int, int]]:
    """Rungs of successive halving: ``[(candidates, volumes), ...]``.

    The first rung scores all candidates on ``min_volumes`` volumes; each next rung keeps the
    best ``ceil(candidates / eta)`` and scores them on ``eta`` times as many volumes; the last
    rung has every volume (its best is the answer). With one volume, or few candidates, there is
    a single rung: the exhaustive search.
    """
    rungs = []
    c, v = max(int(n_candidates), 1), min(max(int(min_volumes), 1), n_volumes)
    while v < n_volumes and c > 1:
        rungs.append((c, v))
        c, v = -(-c // eta), min(v * eta, n_volumes)
    rungs.append((c, n_volumes))
    return rungs


def _halving(run: _Runner, space: SearchSpace, cands: list[PostprocessConfig], order: Sequence[int]):
    """Successive halving over ``cands`` (volumes added in ``order``): the best on all volumes."""
    alive = list(cands)
    rungs = halving_schedule(len(cands), len(order), space.halving_eta, space.halving_min_volumes)
    for r, (_, v) in enumerate(rungs):
        vols = list(order[:v])
        stage = f"halving {r + 1}/{len(rungs)} ({v} vol)"
        if r + 1 == len(rungs):  # the last rung scores its few survivors in full: the result table
            means = run.evaluate(alive, stage, vols)
        elif space.halving_bounds:
            alive, means = run.select(alive, stage, vols, rungs[r + 1][0])
        else:
            means = run.evaluate(alive, stage, vols)
            rank = sorted(range(len(alive)), key=lambda a: -means[a])  # stable: ties keep pool order
            alive = [alive[a] for a in sorted(rank[:rungs[r + 1][0]])]
    return _best_of(alive, means)


def _search(run: _Runner, space: SearchSpace, probs: Sequence[ProbVolume], seed: int
            ) -> tuple[PostprocessConfig, float]:
    """The best candidate of ``space.method`` and its mean score."""
    if space.method in ("halving", "exhaustive"):
        cands = _pool(space, seed)
        if space.method == "halving":
            return _halving(run, space, cands, _volume_order(_folds(probs)[0], seed))
        return _best_of(cands, run.evaluate(cands, "exhaustive"))
    stage1 = _first_stage(space)
    best, best_s = _best_of(stage1, run.evaluate(stage1, "grid"))
    if space.method == "random":
        return _random_search(run, space, best, best_s, seed)
    return _coordinate_descent(run, space, best, best_s)


def tune(
    probs: Sequence[ProbVolume],
    labels: Sequence[np.ndarray],
    space: SearchSpace | None = None,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    octant_cache: bool = True,
    curve: bool = True,
) -> TuneResult:
    """Search post-processing settings that maximize the mean local competition score.

    Args:
        probs: out-of-fold probability volumes (:func:`load_probs`), ``(Z, Y, X)`` each, ``uint8``
            codes or floats; they are thresholded as ``float32`` (:func:`kaggle_utils.probs.as_probability`,
            as ``predict`` thresholds its float32 probabilities before saving them).
        labels: ``uint8 (Z, Y, X)`` labels {0, 1, 2} in the same order and shapes.
        space: what to search (:class:`SearchSpace` defaults when ``None``).
        workers: processes scoring (candidate, volume) pairs in parallel (1: this process).
        seed: seed of the random search.
        progress: show a tqdm bar (one step per (candidate, volume) pair).
        octant_cache: reuse the TopoScore counts of octants whose masks were scored before
            (exact; ``False`` only to measure what it saves).
        curve: also score the final settings at every grid threshold on every volume (what
            :func:`plot_threshold_curves` draws; up to ``len(space.threshold)`` pairs per volume more,
            a quarter of a 100-candidate halving search over 20 volumes).

    Returns:
        :class:`TuneResult`.

    Raises:
        ValueError: no volumes, or labels that do not match the probabilities.
    """
    space = space or SearchSpace()
    probs = list(probs)
    if not probs:
        raise ValueError("tune: no probability volumes")
    if len(labels) != len(probs):
        raise ValueError(f"tune: {len(probs)} probability volumes but {len(labels)} labels")
    for p, lab in zip(probs, labels):  # DataError: one line on the CLI, before the search
        if tuple(p.prob.shape) != tuple(np.shape(lab)):
            raise DataError(f"{p.path or p.id}: probability shape {tuple(p.prob.shape)} != label shape "
                            f"{tuple(np.shape(lab))} of volume {p.id}")
    t0 = time.perf_counter()
    run = _Runner([p.prob for p in probs], labels, max(1, int(workers)), progress, octant_cache)
    try:
        best, best_s = _search(run, space, probs, seed)
        if curve:  # the threshold curve of the final settings, for the plot (coordinate: mostly evaluated)
            run.evaluate([_with_threshold(best, t) for t in space.threshold], "curve")
    finally:
        run.close()
    wall = time.perf_counter() - t0

    n_pairs = run.n_pairs
    full = [j for j, r in enumerate(run.rows) if np.isfinite(r[:, 0]).all()]  # halving drops the others
    scores = np.stack([run.rows[j] for j in full])
    cfgs = [run.cfgs[j] for j in full]
    ids = [p.id for p in probs]
    scrolls = [p.scroll_id for p in probs]
    candidates = [CandidateResult(run.cfgs[j], run.stages[j], *(float(x) for x in run.rows[j].mean(axis=0)))
                  for j in full]
    b = full.index(run.index[_key(best)])
    per_scroll = {}
    for s in sorted(set(scrolls)):
        sel = np.array([x == s for x in scrolls])
        per_scroll[s] = dict(zip(PARTS, (float(v) for v in scores[b][sel].mean(axis=0))))
    folds, source = _folds(probs)
    guard = _fold_guard(scores, folds, b, cfgs)
    return TuneResult(
        best=best, best_score=float(best_s), candidates=candidates, scores=scores, ids=ids, scroll_ids=scrolls,
        folds=folds, per_scroll=per_scroll, fold_guard=guard, fold_source=source,
        timings={**run.timings, "wall": wall}, n_tasks=n_pairs, cache=dict(run.cache_counts),
    )


def _folds(probs: Sequence[ProbVolume]) -> tuple[list[int | str | None], str]:
    folds = [p.fold for p in probs]
    if all(f is not None for f in folds) and len(set(folds)) >= 2:
        return list(folds), "sidecar"
    return [p.scroll_id for p in probs], "scroll_id"


def _fold_guard(scores: np.ndarray, folds: Sequence[Any], best: int, cfgs: Sequence[PostprocessConfig]
                ) -> list[FoldGuardRow]:
    """For each fold: the candidate with the best mean on the other folds, scored on this one.

    The choice is among the candidates the search evaluated (the search itself saw every fold),
    so the held-out score is a slightly optimistic but cheap estimate.
    """
    uniq = sorted(set(folds), key=str)
    if len(uniq) < 2:
        return []
    rows = []
    fold_arr = np.array([str(f) for f in folds])
    for f in uniq:
        held = fold_arr == str(f)
        other = scores[:, ~held, 0].mean(axis=1)
        j = int(np.argmax(other))  # first maximum: ties go to the earlier candidate
        on_fold = scores[:, held, 0].mean(axis=1)
        rows.append(FoldGuardRow(f, int(held.sum()), cfgs[j], float(on_fold[j]), float(on_fold[best]),
                                 float(on_fold.max())))
    return rows


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------


def plot_threshold_curves(result: TuneResult, out_png: str | os.PathLike, max_scrolls: int = 8) -> Path:
    """Score and its three parts against the threshold, overall and per scroll_id (PNG).

    Solid lines: every other field at the tuned values; the dashed grey line is the score of the
    first-stage grid (plain threshold, other fields at ``base``). A vertical line marks the best
    threshold.
    """
    import matplotlib.pyplot as plt  # keep the backend: switching it would silence a notebook's plt.show()

    from .data import atomic_path

    scrolls = list(result.per_scroll)[:max_scrolls]
    panels: list[str | None] = [None] + scrolls
    ncol = min(3, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False, sharey=True)
    base = next((c.cfg for c in result.candidates if c.stage == "grid" and not c.cfg.uses_hysteresis), None)
    colors = {"score": "k", "topo_score": "tab:red", "surface_dice": "tab:blue", "voi_score": "tab:green"}
    for ax, s in zip(axes.ravel(), panels):
        t, parts = result.threshold_curve(s)
        for k, name in enumerate(PARTS):
            ax.plot(t, parts[:, k], marker="o", ms=3, color=colors[name], lw=2 if k == 0 else 1.2,
                    label={"score": "score", "topo_score": "TopoScore", "surface_dice": "SurfaceDice",
                           "voi_score": "VOI_score"}[name])
        if base is not None:
            tb, pb = result.threshold_curve(s, base)
            if len(tb) and _key(base) != _key(_with_threshold(result.best, base.threshold)):
                ax.plot(tb, pb[:, 0], ls="--", color="0.6", lw=1.2, label="score, no post-proc.")
        ax.axvline(result.best.threshold, color="0.4", lw=0.8, ls=":")
        n = len(result.ids) if s is None else sum(x == s for x in result.scroll_ids)
        ax.set_title("all volumes" if s is None else f"scroll {s}", fontsize=10)
        ax.text(0.02, 0.03, f"n={n}", transform=ax.transAxes, fontsize=8, color="0.3")
        ax.set_xlabel("threshold")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("mean over volumes")
    axes[0, 0].legend(fontsize=7, loc="lower right" if len(panels) > 1 else "best")
    fig.suptitle(f"tuned: {result.best.summary()}  (score {result.best_score:.4f})", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png
