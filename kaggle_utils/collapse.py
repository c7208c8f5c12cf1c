"""The collapse rule: is a model predicting far too much (or too little) foreground?

The failure this project exists to prevent: a model trained with label 2 ("unlabeled") as surface
learns that ~58 % of voxels are foreground and predicts ~99.9 % foreground everywhere. The numbers
that show it are the per-volume predicted foreground shares (:func:`fg_fraction`) compared with the
labelled surface share of the same volumes (:func:`surface_share`); :func:`collapse_verdict` judges
one validation (or a set of finished predictions), :class:`CollapseGuard` a training run across
validations. Training (``kaggle_utils.train``) and ``diagnose`` (:mod:`kaggle_utils.diagnostics`,
which also draws the figures) use this one rule.

Shares are measured over **labelled** voxels (label != ignore) when labels are known: there the
surface share is about 9-26 % (surface 4-9 % of all voxels, background 25-39 %). Without labels
(test predictions) they are shares of the whole volume and are compared with
:data:`TYPICAL_SURFACE_SHARE`, the same labelled-voxel share: sheets continue through the
unlabeled regions, so a healthy prediction covers about that share of a whole volume.

Pure numpy; imports only :mod:`kaggle_utils.data` (``IGNORE_LABEL``) from the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .data import IGNORE_LABEL

__all__ = [
    "TYPICAL_SURFACE_SHARE",
    "COLLAPSE_MAX_RATIO",
    "COLLAPSE_RECOVER_RATIO",
    "COLLAPSE_MAX_FG",
    "COLLAPSE_MIN_RATIO",
    "COLLAPSE_STOP_AFTER",
    "healthy_band",
    "CollapseVerdict",
    "CollapseGuard",
    "fg_fraction",
    "surface_share",
    "collapse_verdict",
]

#: Range of the surface share among labelled voxels in the competition's training labels
#: (4-9 % surface against 25-39 % background).
TYPICAL_SURFACE_SHARE = (0.09, 0.26)

# The one collapse rule, for the training guard and for ``diagnose`` alike (docs/collapse.md shows
# the measured distributions it is chosen from). A validation (or a set of finished predictions)
# is flagged when the mean predicted share of labelled voxels exceeds COLLAPSE_MAX_RATIO x the
# labelled surface share or COLLAPSE_MAX_FG, or falls below COLLAPSE_MIN_RATIO x it (the uniform
# collapse has two directions); a run that was flagged stays flagged (hysteresis)
# until the ratio is back at or below COLLAPSE_RECOVER_RATIO, and its summary says it was flagged
# even then (CollapseGuard).

#: Flag ``foreground`` collapse above this multiple of the labelled surface share.
COLLAPSE_MAX_RATIO = 2.0
#: A flagged run counts as recovered only at or below this multiple (healthy runs end at 0.9-1.3x).
COLLAPSE_RECOVER_RATIO = 1.5
#: Flag ``foreground`` collapse above this absolute predicted share of labelled voxels.
COLLAPSE_MAX_FG = 0.5
#: Flag ``under`` (strong under-segmentation) below this multiple of the labelled surface share: the
#: mirror of COLLAPSE_MAX_RATIO (a factor of 2 too little, as 2 too much). Healthy runs were at or
#: above 0.57x from their second validation on and 0.89x from epoch 5 (docs/collapse.md).
COLLAPSE_MIN_RATIO = 1.0 / COLLAPSE_MAX_RATIO
#: Flagged validations in a row before :meth:`CollapseGuard.should_stop` says stop (healthy runs
#: were flagged for at most 2 in a row while young; collapsed ones for 8 or more).
COLLAPSE_STOP_AFTER = 3


@dataclass
class CollapseVerdict:
    """Outcome of :func:`collapse_verdict`.

    ``kind`` is ``"healthy"``, ``"foreground"`` (far too much foreground), ``"empty"`` (almost
    nothing predicted), ``"under"`` (strong under-segmentation: less than
    :data:`COLLAPSE_MIN_RATIO` x the surface share), ``"uniform"`` (the same share for every volume whatever its content) or
    ``"constant"`` (probabilities barely vary inside volumes).
    """

    collapsed: bool
    kind: str
    reasons: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = self.stats
        head = "COLLAPSE (" + self.kind + ")" if self.collapsed else "healthy"
        nums = (
            f"predicted fg {100 * s.get('pred_fg_mean', float('nan')):.2f}% mean "
            f"[{100 * s.get('pred_fg_min', float('nan')):.2f}-{100 * s.get('pred_fg_max', float('nan')):.2f}%] over "
            f"{s.get('n_volumes', 0)} volume(s)"
        )
        if s.get("label_fg_mean") is not None:
            nums += f", labelled surface {100 * s['label_fg_mean']:.2f}% mean, ratio {s['ratio']:.2f}x"
        text = "; ".join(self.reasons + self.notes)
        return f"{head}: {nums}" + (" | " + text if text else "")


def fg_fraction(pred: np.ndarray, label: np.ndarray | None = None, ignore_label: int | None = IGNORE_LABEL) -> float:
    """Share of foreground (non-zero) voxels of ``pred`` ``(Z,Y,X)``.

    With ``label`` (same shape, uint8), the share is taken over labelled voxels only
    (``label != ignore_label``); ``nan`` if there are none.
    """
    fg = np.asarray(pred) != 0
    if label is None or ignore_label is None:
        return float(fg.mean()) if fg.size else float("nan")
    if np.shape(label) != fg.shape:
        raise ValueError(f"prediction shape {fg.shape} != label shape {np.shape(label)}")
    valid = np.asarray(label) != ignore_label
    n = int(valid.sum())
    return float((fg & valid).sum() / n) if n else float("nan")


def surface_share(label: np.ndarray, ignore_label: int | None = IGNORE_LABEL) -> float:
    """Share of surface (label 1) among labelled voxels of a ``uint8 (Z,Y,X)`` label volume."""
    label = np.asarray(label)
    return fg_fraction(label == 1, label, ignore_label)


def healthy_band(reference: float, max_ratio: float = COLLAPSE_MAX_RATIO, under_ratio: float = COLLAPSE_MIN_RATIO,
                 max_fg: float = COLLAPSE_MAX_FG) -> tuple[float, float]:
    """``(low, high)``: the mean predicted foreground shares that :func:`collapse_verdict` calls
    neither ``under`` nor ``foreground`` for a surface share ``reference`` (labelled, or the middle of
    :data:`TYPICAL_SURFACE_SHARE` without labels): ``under_ratio`` x to ``max_ratio`` x it, capped at
    ``max_fg``. The band the histograms shade."""
    return float(under_ratio * reference), float(min(max_ratio * reference, max_fg))


def _too_little(mean: float, ref: float, min_ratio: float, under_ratio: float, labelled: bool) -> tuple[str, str] | None:
    """``(kind, reason)`` of a mean predicted share ``mean`` far below the surface share ``ref``:
    ``empty`` below ``min_ratio`` x ``ref``, ``under`` below ``under_ratio`` x; ``None`` otherwise."""
    if ref <= 0:
        return None
    if mean < min_ratio * ref:
        return "empty", f"predicted foreground {100 * mean:.3f}% is under {min_ratio:g}x the surface share ({100 * ref:.1f}%)"
    if mean < under_ratio * ref:
        return "under", (f"predicted foreground is {mean / ref:.2f}x the {'labelled' if labelled else 'typical'} surface "
                         f"share ({100 * mean:.1f}% vs {100 * ref:.1f}%), limit {under_ratio:g}x: strong under-segmentation")
    return None


def collapse_verdict(
    pred_fg: Sequence[float],
    label_fg: Sequence[float] | None = None,
    *,
    prob_std: Sequence[float] | None = None,
    max_ratio: float = COLLAPSE_MAX_RATIO,
    max_fg: float = COLLAPSE_MAX_FG,
    recover_ratio: float = COLLAPSE_RECOVER_RATIO,
    min_ratio: float = 0.05,
    under_ratio: float = COLLAPSE_MIN_RATIO,
    uniform_rel_spread: float = 0.1,
    min_prob_std: float = 0.02,
) -> CollapseVerdict:
    """Decide whether per-volume predictions look collapsed.

    Args:
        pred_fg: predicted foreground share per volume (over labelled voxels when labels exist).
        label_fg: labelled surface share of the same volumes (same voxels); ``None`` for test
            predictions, then :data:`TYPICAL_SURFACE_SHARE` is the reference.
        prob_std: optional standard deviation of the probabilities inside each volume.
        max_ratio: collapse if the mean predicted share exceeds ``max_ratio`` x the labelled share
            (:data:`COLLAPSE_MAX_RATIO`; the same rule for the training guard and ``diagnose``).
        max_fg: collapse if the mean predicted share exceeds this absolute share.
        recover_ratio: not a collapse on its own: a ratio above it (and at most ``max_ratio``)
            adds a note, and :class:`CollapseGuard` keeps a run that was flagged flagged until
            the ratio is at or below it (:data:`COLLAPSE_RECOVER_RATIO`).
        min_ratio: "empty" collapse below ``min_ratio`` x the labelled share.
        under_ratio: "under" below ``under_ratio`` x the labelled share (:data:`COLLAPSE_MIN_RATIO`).
        uniform_rel_spread: "uniform" if the spread (std) of predicted shares across >= 4 volumes is
            below this fraction of the labelled shares' spread while those vary.
        min_prob_std: "constant" if the mean within-volume probability std is below this.
    """
    p = np.asarray([x for x in pred_fg], dtype=np.float64)
    p = p[np.isfinite(p)]
    if p.size == 0:
        raise ValueError("collapse_verdict needs at least one finite predicted foreground share")
    stats: dict = {
        "n_volumes": int(p.size), "pred_fg_mean": float(p.mean()), "pred_fg_min": float(p.min()),
        "pred_fg_max": float(p.max()), "pred_fg_std": float(p.std()), "label_fg_mean": None,
    }
    if label_fg is not None:
        lab = np.asarray(label_fg, dtype=np.float64)
        lab = lab[np.isfinite(lab)]
        ref, ref_std = float(lab.mean()), float(lab.std())
        stats["label_fg_mean"], stats["label_fg_std"] = ref, ref_std
    else:
        ref, ref_std = float(np.mean(TYPICAL_SURFACE_SHARE)), 0.0
        stats["reference_share"] = ref
    stats["ratio"] = float(p.mean() / ref) if ref > 0 else float("inf")
    reasons: list[str] = []
    kind = "healthy"
    if p.mean() > max_fg:
        kind = "foreground"
        reasons.append(f"mean predicted foreground {100 * p.mean():.1f}% > {100 * max_fg:.0f}%")
    if ref > 0 and p.mean() > max_ratio * ref:
        kind = "foreground"
        reasons.append(f"predicted foreground is {p.mean() / ref:.1f}x the {'labelled' if label_fg is not None else 'typical'} "
                       f"surface share ({100 * ref:.1f}%), limit {max_ratio:g}x")
    low = _too_little(float(p.mean()), ref, min_ratio, under_ratio, label_fg is not None)
    if kind == "healthy" and low is not None:
        kind = low[0]
        reasons.append(low[1])
    if kind == "healthy" and p.size >= 4 and ref_std > 0 and p.std() < uniform_rel_spread * ref_std:
        kind = "uniform"
        reasons.append(f"predicted share barely varies across volumes (std {100 * p.std():.3f}% vs labelled std "
                       f"{100 * ref_std:.2f}%): the prediction ignores the input")
    if prob_std is not None:
        s = float(np.nanmean(np.asarray(prob_std, dtype=np.float64)))
        stats["prob_std_mean"] = s
        if kind == "healthy" and s < min_prob_std:
            kind = "constant"
            reasons.append(f"probabilities nearly constant inside volumes (mean std {s:.4f} < {min_prob_std})")
    stats["max_ratio"], stats["recover_ratio"], stats["max_fg"] = float(max_ratio), float(recover_ratio), float(max_fg)
    stats["under_ratio"], stats["healthy_band"] = float(under_ratio), healthy_band(ref, max_ratio, under_ratio, max_fg)
    notes: list[str] = []
    if kind == "healthy" and ref > 0 and p.mean() > recover_ratio * ref:
        notes.append(f"predicted foreground is {p.mean() / ref:.1f}x the {'labelled' if label_fg is not None else 'typical'}"
                     f" surface share, above the {recover_ratio:g}x a recovered run must reach (thick sheets, or a"
                     " collapse that is only partly undone)")
    return CollapseVerdict(kind != "healthy", kind, reasons, stats, notes)


@dataclass
class CollapseGuard:
    """The collapse state of a training run across validations: flags latch, recovery is explicit.

    One per run. After each validation, ``verdict = guard.update(collapse_verdict(...), epoch)``
    returns the verdict to act on and to log. Rules (thresholds from the verdict's own ``stats``,
    i.e. the :func:`collapse_verdict` arguments, by default :data:`COLLAPSE_MAX_RATIO`,
    :data:`COLLAPSE_RECOVER_RATIO`, :data:`COLLAPSE_MAX_FG`):

    * a collapsed verdict flags the run (``state`` ``"collapsed"``);
    * while flagged for ``foreground``, a verdict that is not collapsed but whose ratio is still
      above ``recover_ratio`` is turned into a collapsed ``foreground`` verdict ("still ... above the recovery limit"): a run that
      drifts from 2.7x to 1.8x the labelled share is not called healthy;
    * at or below ``recover_ratio`` the run is ``"recovered"``; it is flagged again by the normal
      rule. :meth:`summary` always names the epochs it was flagged at.

    ``state`` at the end: ``"healthy"`` (never flagged), ``"collapsed"`` (flagged at the last
    validation) or ``"recovered"`` (flagged earlier). The guard is plain data: :meth:`to_json` /
    :meth:`from_json` carry it through a checkpoint (``--resume``) and ``result.json``.

    Attributes:
        history: one dict per validation: ``epoch, kind, collapsed, ratio, pred_fg, label_fg, state``.
        consecutive: collapsed validations in a row up to the latest one.
    """

    history: list[dict] = field(default_factory=list)
    consecutive: int = 0

    @property
    def state(self) -> str:
        """``"healthy"``, ``"collapsed"`` or ``"recovered"`` after the latest validation."""
        if not self.flagged_epochs:
            return "healthy"
        return "collapsed" if self.history[-1]["collapsed"] else "recovered"

    @property
    def flagged_epochs(self) -> list:
        """Epochs (as given to :meth:`update`) whose validation was flagged."""
        return [h["epoch"] for h in self.history if h["collapsed"]]

    @property
    def was_flagged(self) -> bool:
        """Whether any validation so far was flagged (stays True after a recovery)."""
        return bool(self.flagged_epochs)

    def should_stop(self, after: int = COLLAPSE_STOP_AFTER) -> bool:
        """Whether the latest ``after`` validations were all flagged (for ``on_collapse: stop``)."""
        return self.consecutive >= after

    def update(self, verdict: CollapseVerdict, epoch: int | None = None) -> CollapseVerdict:
        """Record one validation's verdict; return it, made collapsed while a flagged run is not recovered.

        Args:
            verdict: from :func:`collapse_verdict` on this validation's per-volume shares.
            epoch: the (1-based) epoch, for the summary; default: the validation's number.

        Returns:
            The verdict to act on (``on_collapse``) and to log.
        """
        epoch = len(self.history) + 1 if epoch is None else epoch
        st = verdict.stats
        ratio = st.get("ratio", float("nan"))
        recover = st.get("recover_ratio", COLLAPSE_RECOVER_RATIO)
        prev = self.history[-1] if self.history else None
        over_before = prev is not None and prev["collapsed"] and prev["kind"] == "foreground"
        out = verdict
        if over_before and not verdict.collapsed:
            if not (math.isfinite(ratio) and ratio <= recover):  # hysteresis: not back in the healthy band
                out = CollapseVerdict(True, "foreground", [
                    f"flagged since epoch {self._first_of_streak()} and not recovered: predicted foreground still "
                    f"{ratio:.1f}x the labelled surface share, above the recovery limit {recover:g}x"], dict(st), [])
            else:
                out = CollapseVerdict(False, verdict.kind, list(verdict.reasons), dict(st), verdict.notes + [
                    f"recovered: {ratio:.2f}x <= {recover:g}x (flagged at epoch(s) {self._epochs_text()})"])
        self.consecutive = self.consecutive + 1 if out.collapsed else 0
        self.history.append({
            "epoch": epoch, "kind": out.kind, "collapsed": bool(out.collapsed), "ratio": _num(ratio),
            "pred_fg": _num(st.get("pred_fg_mean")), "label_fg": _num(st.get("label_fg_mean")),
        })
        self.history[-1]["state"] = self.state
        return out

    def _first_of_streak(self) -> int:
        first = self.history[-1]["epoch"]
        for h in reversed(self.history):
            if not h["collapsed"]:
                break
            first = h["epoch"]
        return first

    def _epochs_text(self) -> str:
        ep = self.flagged_epochs
        return ", ".join(str(e) for e in ep[:8]) + (f" ... ({len(ep)} in all)" if len(ep) > 8 else "")

    def summary(self) -> str:
        """One line for the end of a run: never flagged, still collapsed, or flagged earlier and recovered."""
        if not self.history:
            return "collapse guard: no validation yet"
        last = self.history[-1]
        ratios = [h["ratio"] for h in self.history if h["ratio"] is not None]
        peak = max(ratios) if ratios else float("nan")
        tail = f"last {last['ratio']:.2f}x" if last["ratio"] is not None else "last ratio unknown"
        n = len(self.history)
        if not self.was_flagged:
            return f"collapse guard: healthy, never flagged in {n} validation(s) (max {peak:.2f}x, {tail})"
        flagged = self.flagged_epochs
        head = (f"flagged at epoch(s) {self._epochs_text()} ({len(flagged)} of {n} validations, kind "
                f"{', '.join(sorted({h['kind'] for h in self.history if h['collapsed']}))}, max {peak:.2f}x)")
        if self.state == "collapsed":
            return f"collapse guard: COLLAPSED: {head}; still flagged at the end ({tail})"
        recovered_at = next(h["epoch"] for h in reversed(self.history) if h["collapsed"])
        after = [h["epoch"] for h in self.history if not h["collapsed"] and h["epoch"] > recovered_at]
        return (f"collapse guard: FLAGGED EARLIER, recovered: {head}; at or below the recovery limit since epoch "
                f"{after[0]} ({tail})")

    def to_json(self) -> dict:
        """Plain-JSON state (for checkpoints and ``result.json``)."""
        return {"state": self.state, "flagged_epochs": self.flagged_epochs, "consecutive": self.consecutive,
                "summary": self.summary(), "history": [dict(h) for h in self.history]}

    @classmethod
    def from_json(cls, data: dict | None) -> "CollapseGuard":
        """Rebuild a guard from :meth:`to_json` output (``None`` or ``{}``: a fresh guard)."""
        if not data:
            return cls()
        return cls(history=[dict(h) for h in data.get("history", [])], consecutive=int(data.get("consecutive", 0)))


def _num(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None
