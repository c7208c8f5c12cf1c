"""The competition score of one volume and of a dataset, reproducing the official scorer.

Per volume (see ``docs/metric.md``)::

    score = clip(0.30 * TopoScore + 0.35 * SurfaceDice@2 + 0.35 * VOI_score, 0, 1)

after one preprocessing step shared by all three terms (:func:`preprocess`): NaN counts as 0,
foreground is any non-zero value, and voxels where the ground truth equals the ignore label (2)
are set to background in *both* volumes. The dataset score is the plain mean over volumes.

``backend="official"`` runs the official ``topometrics`` package instead (Kaggle dataset
``sohier/vesuvius-metric-resources``) when it is importable; it gives the same numbers, slower.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from ..data import IGNORE_LABEL, DataError
from ..submission import TIF_SUFFIXES, Locator, describe_location, list_volumes, read_located, zip_metadata_warning

if TYPE_CHECKING:  # topo pulls in numba: imported when scoring, not with the package
    from .topo import OctantCache

__all__ = [
    "WEIGHTS",
    "VOI_ALPHA",
    "SD_TOLERANCE",
    "VolumeScore",
    "DatasetScore",
    "ScoreBound",
    "GroundTruthCache",
    "preprocess",
    "score_volume",
    "score_bound",
    "score_dataset",
    "prediction_warnings",
]

WEIGHTS = (0.30, 0.35, 0.35)  # TopoScore, SurfaceDice, VOI_score
VOI_ALPHA = 0.3
SD_TOLERANCE = 2.0
BACKENDS = ("ours", "official")

Counts = dict[int, tuple[int, int, int]]


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeScore:
    """Score of one volume and its parts.

    Attributes:
        score: the competition score, ``clip(0.30 topo + 0.35 SD + 0.35 VOI_score, 0, 1)``.
        topo_score: weighted topological F1 (Betti matching over the 8 octants).
        surface_dice: SurfaceDice at tolerance 2.
        voi_score: ``1 / (1 + 0.3 * (voi_split + voi_merge))``.
        voi_split: H(pred components | gt components) in bits.
        voi_merge: H(gt components | pred components) in bits.
        topo_counts: ``{k: (m_k, p_k, g_k)}`` matched / predicted / GT features per dimension.
        topo_f1: ``{k: F1_k or None}`` (None: dimension inactive).
    """

    score: float
    topo_score: float
    surface_dice: float
    voi_score: float
    voi_split: float
    voi_merge: float
    topo_counts: Counts = field(default_factory=dict)
    topo_f1: dict[int, float | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        """Plain-JSON dict: the six numbers and ``topo_counts`` as ``{"0": [m, p, g], ...}``."""
        return {
            "score": float(self.score),
            "topo_score": float(self.topo_score),
            "surface_dice": float(self.surface_dice),
            "voi_score": float(self.voi_score),
            "voi_split": float(self.voi_split),
            "voi_merge": float(self.voi_merge),
            "topo_counts": {str(k): [int(x) for x in v] for k, v in sorted(self.topo_counts.items())},
        }


@dataclass(frozen=True)
class DatasetScore:
    """Mean score over volumes and the per-volume results (``{id: VolumeScore}``, sorted by id).

    ``warnings`` holds one line per suspicious input that was scored anyway, exactly as the
    official scorer would score it (see :func:`prediction_warnings`; zip entries inside folders).
    """

    mean: float
    volumes: dict[str, VolumeScore]
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """``{"mean", "volumes"}`` plus ``"warnings"`` when there are any."""
        out: dict = {"mean": float(self.mean), "volumes": {k: v.to_json() for k, v in self.volumes.items()}}
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


# ----------------------------------------------------------------------------------------------
# One volume
# ----------------------------------------------------------------------------------------------


def _foreground(vol: np.ndarray) -> np.ndarray:
    """Non-zero voxels, NaN counting as 0."""
    fg = vol != 0
    if np.issubdtype(vol.dtype, np.floating):
        fg &= ~np.isnan(vol)
    return fg


def preprocess(
    pred: np.ndarray, gt: np.ndarray, ignore_label: int | None = IGNORE_LABEL
) -> tuple[np.ndarray, np.ndarray]:
    """Binarize a prediction and a label volume the way the official scorer does.

    Args:
        pred: ``(Z, Y, X)`` prediction of any numeric dtype; non-zero (NaN excepted) is foreground,
            so soft probabilities must be thresholded before.
        gt: ``(Z, Y, X)`` labels ``{0, 1, 2}``; ``gt == ignore_label`` is ignored.
        ignore_label: label value whose voxels are removed from both volumes (None: no ignore).

    Returns:
        ``(pred_bin, gt_bin)``, both ``bool (Z, Y, X)``, ignored voxels False in both.

    Raises:
        ValueError: the shapes differ or are not 3D.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected 3D (Z, Y, X) volumes, got shape {pred.shape}")
    pred_bin = _foreground(pred)
    gt_bin = _foreground(gt)
    if ignore_label is not None:
        keep = gt != ignore_label
        pred_bin &= keep
        gt_bin &= keep
    return pred_bin, gt_bin


def _combine(topo: float, sd: float, voi_score: float) -> float:
    total = sum(WEIGHTS)  # the official scorer renormalizes its weights the same way
    w_topo, w_sd, w_voi = (w / total for w in WEIGHTS)
    return float(np.clip(w_topo * topo + w_sd * sd + w_voi * voi_score, 0.0, 1.0))


@dataclass(frozen=True)
class ScoreBound:
    """An upper bound of a volume's score that skips TopoScore's expensive Betti-matching reductions.

    SurfaceDice and VOI are exact; TopoScore is bounded by :func:`~kaggle_utils.metrics.topo.
    topo_counts_bound` (exact p_k, g_k and m_0, m_1 and m_2 bounded by the pair counts). The score
    only grows with TopoScore, so ``upper >= score_volume(...).score`` for the same pair.

    Attributes:
        upper: the bound of the competition score.
        topo_upper: the bound of TopoScore.
        surface_dice, voi_score, voi_split, voi_merge: exact, as in :class:`VolumeScore`.
        exact_octants: octants whose counts came exact from the octant cache (8: ``upper`` is exact).
    """

    upper: float
    topo_upper: float
    surface_dice: float
    voi_score: float
    voi_split: float
    voi_merge: float
    exact_octants: int = 0


@dataclass
class GroundTruthCache:
    """What the score needs of one ground-truth volume alone, computed at its first use and shared
    by every prediction scored against the same labels afterwards (``tune``'s candidates).

    Filled lazily by :func:`score_volume` / :func:`score_bound`: the GT's TopoScore closed forms per
    octant (:func:`~kaggle_utils.metrics.topo.gt_closed_forms`), its 26-connected component labels
    for VOI (:func:`~kaggle_utils.metrics.voi.component_labels`) and its SurfaceDice side (surfels,
    areas and the tolerance map, :func:`~kaggle_utils.metrics.surface_dice.prepare_surface`). The
    scores are bit-for-bit those without the cache. The binarized GT is kept to check that later
    calls pass the same volume (a different one raises ``ValueError``). 3-4 bytes per voxel plus
    the component labels (2 or 4 bytes per voxel): keep one per volume being scored, not all.
    """

    gt_bin: np.ndarray | None = None
    topo_forms: list | None = None
    voi_labels: np.ndarray | None = None
    surface: object | None = None

    def bind(self, gt_bin: np.ndarray) -> None:
        """Remember ``gt_bin`` (``bool (Z, Y, X)``) at first use; raise if a later one differs."""
        if self.gt_bin is None:
            self.gt_bin = gt_bin.copy()
        elif self.gt_bin.shape != gt_bin.shape or not np.array_equal(self.gt_bin, gt_bin):
            raise ValueError("score_volume: gt_cache holds another ground-truth volume than the one given")


def _sd_voi(pred_bin: np.ndarray, gt_bin: np.ndarray, reuse: ScoreBound | None,
            gt_cache: GroundTruthCache | None = None) -> tuple[float, float, float, float]:
    """``(SurfaceDice, VOI score, split, merge)``, from ``reuse`` when given (same masks); the GT's
    parts from ``gt_cache`` (bound to ``gt_bin`` by the caller), filled in when missing."""
    if reuse is not None:
        return reuse.surface_dice, reuse.voi_score, reuse.voi_split, reuse.voi_merge
    from .surface_dice import prepare_surface, surface_dice
    from .voi import component_labels, voi

    if gt_cache is None:
        v = voi(pred_bin, gt_bin, alpha=VOI_ALPHA)
        return surface_dice(pred_bin, gt_bin, tau=SD_TOLERANCE), v.score, v.split, v.merge
    if gt_cache.voi_labels is None:
        labels = component_labels(gt_bin, connectivity=26)
        gt_cache.voi_labels = labels.astype(np.uint16) if labels.max(initial=0) < 2**16 else labels
    if gt_cache.surface is None:
        gt_cache.surface = prepare_surface(gt_bin, tau=SD_TOLERANCE)
    v = voi(pred_bin, gt_bin, alpha=VOI_ALPHA, gt_labels=gt_cache.voi_labels)
    sd = surface_dice(pred_bin, gt_bin, tau=SD_TOLERANCE, gt_prepared=gt_cache.surface)
    return sd, v.score, v.split, v.merge


def _beside_sd_voi(topo: Callable[[], Any], pred_bin: np.ndarray, gt_bin: np.ndarray, reuse: ScoreBound | None,
                   gt_cache: GroundTruthCache | None) -> tuple[Any, tuple[float, float, float, float]]:
    """``(topo(), _sd_voi(...))``, SurfaceDice and VOI computed in a second thread while ``topo`` runs
    TopoScore's octant threads: the numba kernels release the GIL, so the cores stay busy to the end
    (~17 % less wall time on 2 cores). Each writes only its own fields of ``gt_cache``."""
    with ThreadPoolExecutor(max_workers=1) as side:
        sd_voi = side.submit(_sd_voi, pred_bin, gt_bin, reuse, gt_cache)
        return topo(), sd_voi.result()


def _gt_forms(gt_bin: np.ndarray, gt_cache: GroundTruthCache | None) -> list | None:
    """The GT's per-octant closed forms from ``gt_cache`` (computed and stored at first use)."""
    if gt_cache is None:
        return None
    if gt_cache.topo_forms is None:
        from .topo import gt_closed_forms

        gt_cache.topo_forms = gt_closed_forms(gt_bin)
    return gt_cache.topo_forms


def _score_ours(pred_bin: np.ndarray, gt_bin: np.ndarray, topo_cache: OctantCache | None = None,
                reuse: ScoreBound | None = None, gt_cache: GroundTruthCache | None = None) -> VolumeScore:
    from .topo import topo_counts, topo_f1_from_counts, topo_score_from_counts

    if gt_cache is not None:
        gt_cache.bind(gt_bin)
    gt_forms = _gt_forms(gt_bin, gt_cache)
    counts, (sd, voi_score, split, merge) = _beside_sd_voi(
        lambda: topo_counts(pred_bin, gt_bin, cache=topo_cache, gt_forms=gt_forms), pred_bin, gt_bin, reuse, gt_cache)
    topo = float(topo_score_from_counts(counts))
    return VolumeScore(
        score=_combine(topo, sd, voi_score), topo_score=topo, surface_dice=sd, voi_score=voi_score,
        voi_split=split, voi_merge=merge,
        topo_counts={int(k): tuple(int(x) for x in c) for k, c in counts.items()},
        topo_f1=topo_f1_from_counts(counts),
    )


def _score_official(pred: np.ndarray, gt: np.ndarray) -> VolumeScore:
    try:
        from topometrics import compute_leaderboard_score
    except ImportError:
        raise ValueError(
            "backend='official' needs the official scorer package `topometrics` (Kaggle dataset "
            "sohier/vesuvius-metric-resources), which is not installed; use backend='ours'"
        ) from None
    rep = compute_leaderboard_score(
        predictions=pred, labels=gt, surface_tolerance=SD_TOLERANCE, spacing=(1.0, 1.0, 1.0),
        voi_connectivity=26, voi_alpha=VOI_ALPHA, combine_weights=WEIGHTS, ignore_label=IGNORE_LABEL,
    )
    counts = {int(k): tuple(int(x) for x in v) for k, v in rep.topo.counts_by_dim.items()}
    f1 = {int(k): (None if v is None else float(v)) for k, v in rep.topo.topoF1_by_dim.items()}
    return VolumeScore(
        score=float(np.clip(rep.score, 0.0, 1.0)), topo_score=float(rep.topo.toposcore),
        surface_dice=float(rep.surface_dice), voi_score=float(rep.voi.voi_score),
        voi_split=float(rep.voi.voi_split), voi_merge=float(rep.voi.voi_merge),
        topo_counts=counts, topo_f1=f1,
    )


def score_volume(pred: np.ndarray, gt: np.ndarray, *, backend: str = "ours",
                 topo_cache: OctantCache | None = None, reuse: ScoreBound | None = None,
                 gt_cache: GroundTruthCache | None = None) -> VolumeScore:
    """Competition score of one prediction against its label volume.

    Args:
        pred: ``(Z, Y, X)`` prediction, any numeric dtype; non-zero is foreground (binarize
            probabilities first). NaN counts as background.
        gt: ``uint8 (Z, Y, X)`` labels: 0 background, 1 surface, 2 ignored.
        backend: ``"ours"`` (this package, fast) or ``"official"`` (the ``topometrics`` package).
        topo_cache: a :class:`~kaggle_utils.metrics.topo.OctantCache` kept across calls on the same
            volume (tuning): octants whose masks were scored before reuse their Betti-matching
            counts. Same result with or without it; ignored by ``"official"``.
        reuse: the :func:`score_bound` of the same pair: its exact SurfaceDice and VOI are taken
            instead of computed again (the caller guarantees the masks are the same).
        gt_cache: a :class:`GroundTruthCache` kept across calls with the same ``gt``: what depends
            on the ground truth alone is computed once. Same result; ignored by ``"official"``.

    Returns:
        :class:`VolumeScore`.

    Raises:
        ValueError: shape mismatch, unknown backend, or ``"official"`` without ``topometrics``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
    pred_bin, gt_bin = preprocess(pred, gt)
    if backend == "official":
        return _score_official(np.asarray(pred), np.asarray(gt))
    return _score_ours(pred_bin, gt_bin, topo_cache, reuse, gt_cache)


def score_bound(pred: np.ndarray, gt: np.ndarray, *, topo_cache: OctantCache | None = None,
                gt_cache: GroundTruthCache | None = None) -> ScoreBound:
    """An upper bound of :func:`score_volume` for about a fifth of its cost (:class:`ScoreBound`).

    Used by ``tune`` to drop candidates that cannot reach the ones it keeps without their full
    TopoScore. Inputs and errors as :func:`score_volume` (backend ``"ours"``); octants known to
    ``topo_cache`` count exactly; ``gt_cache`` as in :func:`score_volume` (SurfaceDice and VOI).
    """
    from .topo import topo_counts_bound, topo_score_from_counts

    pred_bin, gt_bin = preprocess(pred, gt)
    if gt_cache is not None:
        gt_cache.bind(gt_bin)
    (counts, n_exact), (sd, voi_score, split, merge) = _beside_sd_voi(
        lambda: topo_counts_bound(pred_bin, gt_bin, cache=topo_cache), pred_bin, gt_bin, None, gt_cache)
    topo = float(topo_score_from_counts(counts))
    return ScoreBound(upper=_combine(topo, sd, voi_score), topo_upper=topo, surface_dice=sd, voi_score=voi_score,
                      voi_split=split, voi_merge=merge, exact_octants=n_exact)


def prediction_warnings(pred: np.ndarray, name: str = "prediction") -> list[str]:
    """What looks wrong in a prediction volume that the scorer nevertheless scores.

    The official scorer counts every non-zero voxel as foreground and accepts any dtype, so soft
    probabilities, 0/255 masks and uint16 files all give normal-looking numbers. Kaggle's format
    is ``uint8`` with values 0/1.

    Args:
        pred: the prediction as stored, ``(Z, Y, X)`` of any dtype.
        name: the file (or ``zip:entry``) to name in the messages.

    Returns:
        At most one line (empty: a ``uint8``/``bool`` volume of 0/1) naming what is off:
        "unexpected dtype" for anything but ``uint8``/``bool``, "not binary" for values other than
        0 and 1 (NaN included), and what the scorer makes of it.
    """
    pred = np.asarray(pred)
    problems: list[str] = []
    if pred.dtype not in (np.uint8, np.bool_):
        problems.append(f"unexpected dtype {pred.dtype}")
    if pred.dtype != np.bool_ and pred.size:
        has_nan = False
        if pred.dtype.kind in "iu":
            vmin, vmax = pred.min(), pred.max()
            nonbinary = bool(vmin < 0 or vmax > 1)
        else:
            nan = np.isnan(pred)
            has_nan = bool(nan.any())
            nonbinary = has_nan or bool(np.count_nonzero((pred != 0) & (pred != 1)))
            vmin, vmax = (np.nanmin(pred), np.nanmax(pred)) if not nan.all() else (np.nan, np.nan)
        if nonbinary:
            problems.append(f"not binary (values {vmin:g}..{vmax:g}{', NaN' if has_nan else ''})")
    if not problems:
        return []
    return [f"{name}: {', '.join(problems)}; scored as the official scorer does (every non-zero voxel is surface), "
            "but Kaggle expects uint8 0/1: threshold probabilities first"]


def _score_pair(vol_id: str, pred_loc: Locator, gt_loc: Locator, backend: str) -> tuple[str, VolumeScore, list[str]]:
    pred, gt = read_located(pred_loc), read_located(gt_loc)
    try:
        res = score_volume(pred, gt, backend=backend)
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"volume {vol_id!r} ({pred_loc[-1]} vs {gt_loc[-1]}): {exc}") from None
    return vol_id, res, prediction_warnings(pred, describe_location(pred_loc))


def _pick_ids(
    preds: dict[str, Locator], gts: dict[str, Locator], ids: Iterable[str] | None, pred_ids_only: bool
) -> list[str]:
    if ids is not None:
        wanted = [str(i) for i in ids]
    elif pred_ids_only:
        wanted = list(preds)
    else:
        wanted = list(gts)
    missing_gt = [i for i in wanted if i not in gts]
    if missing_gt:
        raise DataError(
            f"{len(missing_gt)} id(s) have no ground truth: {', '.join(missing_gt[:20])}"
            + (" ..." if len(missing_gt) > 20 else "")
        )
    missing_pred = [i for i in wanted if i not in preds]
    if missing_pred:
        raise DataError(
            f"{len(missing_pred)} id(s) have no prediction: {', '.join(missing_pred[:20])}"
            + (" ..." if len(missing_pred) > 20 else "")
        )
    return wanted


def score_dataset(
    pred_source: str | os.PathLike,
    gt_source: str | os.PathLike,
    *,
    ids: Sequence[str] | None = None,
    workers: int = 1,
    progress: bool = True,
    backend: str = "ours",
) -> DatasetScore:
    """Score every volume of a prediction source against the ground truth; mean over volumes.

    Args:
        pred_source: a ``.tif``, a folder of ``{id}.tif`` or a ``submission.zip``.
        gt_source: a ``.tif``, a folder of ``{id}.tif`` or a competition-layout folder
            (``train_labels/`` is used). If both sources are single files they are paired
            whatever their names (id = the ground truth's file stem).
        ids: volumes to score. Default: every predicted id when the ground truth is a
            competition layout (scoring one fold of the training set) or the prediction is a
            single ``.tif``; otherwise every ground-truth id, so a missing prediction is an error.
        workers: processes (``>1`` uses a process pool; each worker reads its own files).
        progress: show a tqdm bar.
        backend: ``"ours"`` or ``"official"`` (see :func:`score_volume`).

    Returns:
        :class:`DatasetScore` with volumes sorted by id; its ``warnings`` name predictions that
        are scored as the official scorer does but are probably not what was meant (not binary,
        unexpected dtype: :func:`prediction_warnings`; zip entries inside a folder).

    Raises:
        DataError: unreadable sources, corrupt or truncated TIFFs (naming the file or zip entry),
            ids without prediction or ground truth, shape mismatch.
        ValueError: unknown backend or ``"official"`` not installed.
    """
    from ..progress import progress_bar

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}, expected one of {BACKENDS}")
    gts = list_volumes(gt_source, role="gt")
    preds = list_volumes(pred_source, role="pred")
    gt_path, pred_path = Path(gt_source), Path(pred_source)
    if gt_path.is_file() and pred_path.is_file() and pred_path.suffix.lower() in TIF_SUFFIXES:
        preds = {next(iter(gts)): next(iter(preds.values()))}
    # a competition layout holds every training label: score what was predicted (e.g. one fold);
    # a single predicted file is scored alone; otherwise every ground-truth volume is expected
    pred_ids_only = (gt_path.is_dir() and (gt_path / "train_labels").is_dir()) or pred_path.is_file() and \
        pred_path.suffix.lower() in TIF_SUFFIXES
    wanted = _pick_ids(preds, gts, ids, pred_ids_only)

    results: dict[str, VolumeScore] = {}
    warns: dict[str, list[str]] = {}
    bar = progress_bar(total=len(wanted), desc="scoring", unit="vol", enabled=progress)
    try:
        if workers > 1 and len(wanted) > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(wanted))) as pool:
                futures = [pool.submit(_score_pair, i, preds[i], gts[i], backend) for i in wanted]
                for fut in as_completed(futures):
                    vol_id, res, warns[vol_id] = fut.result()
                    results[vol_id] = res
                    bar.update(1)
        else:
            for i in wanted:
                vol_id, res, warns[vol_id] = _score_pair(i, preds[i], gts[i], backend)
                results[vol_id] = res
                bar.update(1)
    finally:
        bar.close()
    volumes = {i: results[i] for i in sorted(results)}
    mean = float(np.mean([v.score for v in volumes.values()])) if volumes else float("nan")
    nested = [f"{preds[i][1]}: entry {preds[i][2]!r} is inside a folder; Kaggle expects {i}.tif at the top of the zip"
              for i in sorted(wanted) if preds[i][0] == "zip" and "/" in preds[i][2].strip("/")]
    clutter = zip_metadata_warning(pred_path) if pred_path.suffix.lower() == ".zip" else None
    found = tuple(([clutter] if clutter else []) + nested + [w for i in sorted(warns) for w in warns[i]])
    return DatasetScore(mean=mean, volumes=volumes, warnings=found)
