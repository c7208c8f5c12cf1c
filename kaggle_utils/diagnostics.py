"""Diagnostics: catch a collapsed model at a glance.

The failure this project exists to prevent: a model trained with label 2 ("unlabeled") as surface
learns that ~58 % of voxels are foreground and predicts ~99.9 % foreground everywhere. The numbers
that show it are the per-volume predicted foreground shares compared with the labelled surface
share of the same volumes (:func:`collapse_verdict`, :func:`plot_fg_histogram`).

Shares are measured over **labelled** voxels (label != ignore) when labels are known: there the
surface share is about 9-26 % (surface 4-9 % of all voxels, background 25-39 %). Without labels
(test predictions) they are shares of the whole volume and are compared with
:data:`TYPICAL_SURFACE_SHARE`, the same labelled-voxel share: sheets continue through the
unlabeled regions, so a healthy prediction covers about that share of a whole volume.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from .data import IGNORE_LABEL, DataError, load_index, read_label, read_volume

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .postprocess import PostprocessConfig

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
    "plot_fg_histogram",
    "plot_montage",
    "plot_training_log",
    "plot_prob_histogram",
    "load_predictions",
    "diagnose",
    "diagnose_figure",
    "fold_table",
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


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


# Figures are built with the object-oriented API (``matplotlib.figure.Figure``), never through
# pyplot and never with ``matplotlib.use``: switching the backend inside a running Jupyter kernel
# silences every later ``plt.show()``. A bare ``Figure`` saves PNGs headless (Agg canvas) and
# shows in a notebook with ``display(fig)``; it is not kept alive by pyplot, so nothing leaks.


def _figure(figsize: tuple[float, float]) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig: "Figure", out: str | os.PathLike | None) -> "Figure":
    """Write ``fig`` as PNG to ``out`` atomically (when given); return ``fig``."""
    if out is not None:
        from .data import atomic_path

        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return fig


def plot_fg_histogram(pred_fg: Sequence[float], label_fg: Sequence[float] | None = None,
                      out: str | os.PathLike | None = None, ax: "Axes | None" = None,
                      verdict: CollapseVerdict | None = None) -> "Figure":
    """Histogram of per-volume predicted foreground % beside the labelled surface % (collapse at a glance).

    The shaded band is where the verdict's mean predicted share is healthy (:func:`healthy_band`:
    :data:`COLLAPSE_MIN_RATIO` to :data:`COLLAPSE_MAX_RATIO` x the reference share); the dashed line
    is that mean, so title, band and bars agree.

    Args:
        pred_fg: predicted foreground share per volume (0-1).
        label_fg: labelled surface share of the same volumes (shares of labelled voxels); ``None``:
            test predictions (shares of all voxels), judged against :data:`TYPICAL_SURFACE_SHARE`.
        out: also write the figure as PNG here.
        ax: draw into these axes (of another figure) instead of a new figure.
        verdict: the verdict shown in the title; default :func:`collapse_verdict` of the shares.

    Returns:
        The figure (``display(fig)`` in a notebook).
    """
    fig = None
    if ax is None:
        fig = _figure((6.4, 3.6))
        ax = fig.subplots()
    from matplotlib.ticker import MaxNLocator

    p = 100 * np.asarray(pred_fg, dtype=float)
    bins = np.linspace(0, 100, 51)
    verdict = verdict or collapse_verdict(pred_fg, label_fg)
    st = verdict.stats
    of = "labelled voxels" if label_fg is not None else "all voxels"
    ref_name = "labelled surface share" if label_fg is not None else "typical surface share"
    lo, hi = (100 * x for x in st["healthy_band"])
    ax.axvspan(lo, hi, color="tab:green", alpha=0.15,
               label=f"healthy mean: {st['under_ratio']:g}-{st['max_ratio']:g}x the {ref_name} ({lo:.1f}-{hi:.1f}%)")
    ax.hist(p, bins=bins, alpha=0.7, color="tab:red", label=f"predicted fg (n={p.size})")
    if label_fg is not None:
        ax.hist(100 * np.asarray(label_fg, dtype=float), bins=bins, alpha=0.6, color="tab:blue", label="labelled surface")
    ax.axvline(100 * st["pred_fg_mean"], color="tab:red", ls="--", lw=1, label=f"mean predicted {100 * st['pred_fg_mean']:.1f}%")
    ax.set_title(("COLLAPSE: " + verdict.kind) if verdict.collapsed else "healthy",
                 color="tab:red" if verdict.collapsed else "tab:green")
    ax.set_xlabel(f"foreground share per volume (% of {of})")
    ax.set_ylabel("volumes")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return _save(fig if fig is not None else ax.figure, out)


def plot_montage(image: np.ndarray, label: np.ndarray | None = None, prob: np.ndarray | None = None,
                 pred: np.ndarray | None = None, slices: Sequence[int] | None = None,
                 out: str | os.PathLike | None = None, title: str = "") -> "Figure":
    """Rows of z-slices: image, label (0 black, 1 white, 2 grey), probability, binary prediction.

    Args:
        image: ``(Z, Y, X)`` volume (any dtype).
        label: ``uint8 (Z, Y, X)`` labels {0, 1, 2}.
        prob: ``float (Z, Y, X)`` probabilities in [0, 1].
        pred: ``(Z, Y, X)`` binary prediction (non-zero = surface).
        slices: z indices (rows); default the quarter, half and three-quarter planes.
        out: also write the figure as PNG here.
        title: figure title.

    Returns:
        The figure.
    """
    z = image.shape[0]
    slices = list(slices) if slices is not None else [z // 4, z // 2, (3 * z) // 4]
    panels = [("image", image, "gray", None)]
    if label is not None:
        panels.append(("label (2=grey)", np.where(label == 2, 0.5, label == 1).astype(float), "gray", (0, 1)))
    if prob is not None:
        panels.append(("probability", prob, "magma", (0, 1)))
    if pred is not None:
        panels.append(("prediction", (np.asarray(pred) != 0).astype(float), "gray", (0, 1)))
    fig = _figure((2.6 * len(panels), 2.6 * len(slices)))
    axes = fig.subplots(len(slices), len(panels), squeeze=False)
    for r, zi in enumerate(slices):
        for c, (name, vol, cmap, lim) in enumerate(panels):
            ax = axes[r][c]
            kw = {} if lim is None else {"vmin": lim[0], "vmax": lim[1]}
            ax.imshow(np.asarray(vol)[zi], cmap=cmap, **kw)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"z={zi}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def _read_jsonl(path) -> list[dict]:
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def _flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in row.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
            flat[prefix + k] = float(v)
    return flat


#: Validation score and its parts (``metrics.jsonl`` key, legend), drawn on one 0-1 axis.
_SCORE_KEYS = (("val_score", "score"), ("val_topo", "TopoScore"), ("val_sd", "SurfaceDice"),
               ("val_voi", "VOI score"), ("val_dice", "Dice (labelled voxels)"))


def _curve(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(epochs, values)`` of the rows holding a finite ``key`` (epoch: the row's, else its 1-based index)."""
    pts = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(rows) if key in r]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _loss_panel(ax: "Axes", rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r if k in ("train_loss", "loss") or k.startswith(("train_", "parts."))})
    for k in sorted(keys, key=lambda k: (k not in ("train_loss", "loss"), k)):
        total = k in ("train_loss", "loss")
        ax.plot(*_curve(rows, k), marker="o", ms=3, lw=2.2 if total else 1.2, color="k" if total else None,
                label="total" if total else k.removeprefix("train_").removeprefix("parts."))
    ax.set_title("training loss and its parts"), ax.set_ylabel("loss")


def _score_panel(ax: "Axes", rows: list[dict]) -> bool:
    drawn = False
    for k, name in _SCORE_KEYS:
        x, y = _curve(rows, k)
        if x:
            ax.plot(x, y, marker="o", ms=3, lw=2.2 if k == "val_score" else 1.2, label=name,
                    color="k" if k == "val_score" else None)
            drawn = True
    ax.set_ylim(0, 1), ax.set_title("validation score and its parts"), ax.set_ylabel("score (0-1)")
    return drawn


def _fg_panel(ax: "Axes", raw: list[dict], rows: list[dict]) -> bool:
    x, y = _curve(rows, "val_fg_pct")
    if not x:
        return False
    _, lo = _curve(rows, "val_fg_min_pct")
    _, hi = _curve(rows, "val_fg_max_pct")
    if len(lo) == len(x) == len(hi):
        ax.fill_between(x, lo, hi, color="tab:red", alpha=0.15, label="predicted, min-max per volume")
    ax.plot(x, y, marker="o", ms=3, color="tab:red", label="predicted (mean)")
    xl, yl = _curve(rows, "val_label_fg_pct")
    if xl:
        ax.plot(xl, yl, ls="--", color="tab:blue", label="labelled surface")
        band = [healthy_band(v / 100) for v in yl]
        ax.fill_between(xl, [100 * b[0] for b in band], [100 * b[1] for b in band], color="tab:green", alpha=0.1,
                        label=f"healthy mean ({COLLAPSE_MIN_RATIO:g}-{COLLAPSE_MAX_RATIO:g}x labelled)")
    bad = [(r.get("epoch", i + 1), r["val_fg_pct"]) for i, r in enumerate(raw)
           if r.get("collapse") not in (None, "healthy") and "val_fg_pct" in r]
    if bad:
        ax.plot(*zip(*bad), ls="none", marker="x", ms=8, color="k", label="collapse guard flagged")
    ax.set_ylim(bottom=0), ax.set_title("foreground share of labelled voxels"), ax.set_ylabel("% of labelled voxels")
    return True


def plot_training_log(metrics_jsonl: str | os.PathLike, out: str | os.PathLike | None = None) -> "Figure":
    """A run's curves from its ``metrics.jsonl``, one quantity per axis (as nnU-Net's progress plot):
    training loss and its parts; validation score and its parts (0-1); predicted and labelled
    foreground share (% of labelled voxels, collapse flags marked); learning rate (log scale).
    Epochs have integer ticks. Returns the figure."""
    from matplotlib.ticker import MaxNLocator

    raw = _read_jsonl(metrics_jsonl)
    rows = [_flatten(r) for r in raw]
    fig = _figure((12, 7))
    (ax_loss, ax_score), (ax_fg, ax_lr) = fig.subplots(2, 2)
    _loss_panel(ax_loss, rows)
    validated = _score_panel(ax_score, rows)
    fg = _fg_panel(ax_fg, raw, rows)
    x, y = _curve(rows, "lr")
    if x:
        ax_lr.plot(x, y, marker="o", ms=3, color="tab:purple")
        ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate"), ax_lr.set_ylabel("lr (log scale)")
    for ax, has in ((ax_loss, True), (ax_score, validated), (ax_fg, fg), (ax_lr, bool(x))):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not has:
            ax.text(0.5, 0.5, "no validation in this run" if ax in (ax_score, ax_fg) else "not logged",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        elif ax is not ax_lr:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def plot_prob_histogram(probs: Iterable[np.ndarray], out: str | os.PathLike | None = None,
                        ax: "Axes | None" = None) -> "Figure":
    """Histogram (log counts) of probabilities (``float (Z, Y, X)`` each) pooled over volumes; returns the figure."""
    fig = None
    if ax is None:
        fig = _figure((6.4, 3.6))
        ax = fig.subplots()
    bins = np.linspace(0, 1, 51)
    counts = np.zeros(50)
    for p in probs:
        counts += np.histogram(np.asarray(p, dtype=np.float32), bins=bins)[0]
    ax.bar(bins[:-1], counts, width=bins[1] - bins[0], align="edge", color="tab:purple")
    ax.set_yscale("log")
    ax.set_xlabel("probability"), ax.set_ylabel("voxels"), ax.set_title("probability histogram")
    return _save(fig if fig is not None else ax.figure, out)


def fold_table(index, folds: dict[str, int]) -> str:
    """Text table of volumes per scroll and fold (a data overview; a scroll sits in one fold only).

    Args:
        index: a :class:`~kaggle_utils.data.DatasetIndex`.
        folds: ``{id: fold}`` from :func:`~kaggle_utils.data.make_folds`.
    """
    counts: dict[tuple[str, int], int] = {}
    for r in index:
        key = (r.scroll_id, folds[r.id])
        counts[key] = counts.get(key, 0) + 1
    n_folds = max(folds.values()) + 1 if folds else 0
    head = f"{'scroll_id':>10} " + " ".join(f"{'fold ' + str(f):>7}" for f in range(n_folds)) + f" {'total':>7}"
    lines = [head]
    for scroll in sorted({s for s, _ in counts}, key=lambda s: -sum(v for (t, _), v in counts.items() if t == s)):
        row = [counts.get((scroll, f), 0) for f in range(n_folds)]
        lines.append(f"{scroll:>10} " + " ".join(f"{c:>7}" for c in row) + f" {sum(row):>7}")
    totals = [sum(v for (_, f), v in counts.items() if f == fold) for fold in range(n_folds)]
    lines.append(f"{'total':>10} " + " ".join(f"{c:>7}" for c in totals) + f" {sum(totals):>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# diagnose: predictions on disk → verdict + report
# ----------------------------------------------------------------------------------------------


def load_predictions(source: str | os.PathLike) -> Iterable[tuple[str, np.ndarray]]:
    """Yield ``(id, volume)`` from a ``submission.zip``, or a folder of ``{id}.tif`` or probability files.

    TIFFs are returned as stored (uint8 binary/probability TIFFs, float TIFFs), found and read by the
    scorer's :func:`~kaggle_utils.submission.list_volumes` / :func:`~kaggle_utils.submission.read_located`
    (a corrupt TIFF is a :class:`DataError` naming it). Probability files (``{id}.npz`` compact,
    ``{id}.npy`` float16: ``train``'s ``oof/``, ``predict --save-probs``) are read by
    :func:`kaggle_utils.probs.read_probs` and returned as ``float32`` probabilities.
    """
    from .submission import list_volumes, read_located
    from .probs import as_probability, find_prob_files, read_probs

    source = Path(source)
    if source.is_file() and source.suffix == ".zip":
        for vid, loc in list_volumes(source, role="pred").items():
            yield vid, read_located(loc)
        return
    if source.is_dir():
        tifs = list_volumes(source, role="pred") if any(source.glob("*.tif")) else {}
        prob_files = find_prob_files(source, recursive=False)
        if not tifs and not prob_files:
            raise DataError(f"{source}: no .tif, .npz or .npy predictions found")
        for vid, loc in tifs.items():
            yield vid, read_located(loc)
        for f in prob_files:
            yield f.stem, as_probability(read_probs(f))
        return
    raise DataError(f"{source}: expected a submission .zip or a folder of .tif/.npz/.npy predictions")


def _to_prob(vol: np.ndarray, postprocess: "PostprocessConfig") -> tuple[np.ndarray | None, np.ndarray]:
    """(probability or None, binary) from a stored prediction volume; probabilities are binarized as
    ``predict`` would (:func:`kaggle_utils.postprocess.binarize`: the config's threshold or hysteresis)."""
    from .postprocess import binarize

    vol = np.asarray(vol)
    if vol.dtype.kind == "f":
        prob = np.nan_to_num(vol.astype(np.float32))
        return prob, binarize(prob, postprocess).astype(bool)
    if vol.dtype == np.uint8 and vol.max(initial=0) > 1:  # uint8-quantized probabilities
        prob = vol.astype(np.float32) / 255.0
        return prob, binarize(prob, postprocess).astype(bool)
    return None, vol != 0


def as_postprocess(postprocess: "PostprocessConfig | str | os.PathLike | None") -> "PostprocessConfig":
    """The post-processing whose binarization turns stored probabilities into masks: ``None`` is the
    default (threshold 0.5), a path or shipped name is read with
    :func:`kaggle_utils.postprocess.load_postprocess` (e.g. ``tune``'s output: the tuned threshold)."""
    from .postprocess import PostprocessConfig, load_postprocess

    if postprocess is None:
        return PostprocessConfig()
    if isinstance(postprocess, PostprocessConfig):
        return postprocess
    return load_postprocess(postprocess)


def diagnose(pred_source: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             out_png: str | os.PathLike | None = None,
             ids: Sequence[str] | None = None,
             postprocess: "PostprocessConfig | str | os.PathLike | None" = None) -> tuple[CollapseVerdict, list[dict]]:
    """Per-volume foreground shares of stored predictions, a collapse verdict and a report PNG.

    Args:
        pred_source: ``submission.zip`` or folder of ``{id}.tif`` (binary or probabilities) or probability files.
        data_dir: competition-layout folder; labels of train ids are used when present.
        out_png: where to write the report (histogram, probability histogram, montage of the first id).
        ids: restrict to these ids.
        postprocess: how probability predictions become masks (:func:`as_postprocess`): the tuned
            post-processing YAML (``tune --out``) or the training config's ``postprocess`` section,
            so the shares are those of the masks ``predict`` would write; ``None``: threshold 0.5.
            Binary predictions (a submission) are taken as they are.

    Returns:
        ``(verdict, rows)`` with one dict per volume: id, fg (share), label_fg, prob_std.
        :func:`diagnose_figure` returns the report figure as well.
    """
    verdict, rows, _fig = _diagnose(pred_source, data_dir, out_png, ids, as_postprocess(postprocess),
                                    figure=out_png is not None)
    return verdict, rows


def diagnose_figure(pred_source: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                    out_png: str | os.PathLike | None = None,
                    ids: Sequence[str] | None = None,
                    postprocess: "PostprocessConfig | str | os.PathLike | None" = None,
                    ) -> tuple[CollapseVerdict, list[dict], "Figure"]:
    """:func:`diagnose` that also returns the report figure (to ``display`` in a notebook).

    Returns:
        ``(verdict, rows, figure)``; the figure is also written to ``out_png`` when given.
    """
    verdict, rows, fig = _diagnose(pred_source, data_dir, out_png, ids, as_postprocess(postprocess), figure=True)
    return verdict, rows, fig  # type: ignore[return-value]  # figure=True always builds it


def _diagnose(pred_source, data_dir, out_png, ids, postprocess: "PostprocessConfig", figure: bool) -> tuple[CollapseVerdict, list[dict], "Figure | None"]:
    if out_png is not None:
        from .outputs import check_output

        check_output(out_png, "file", what="--out")  # OutputError before any prediction is read
    labels = {}
    images = {}
    if data_dir is not None:
        for split in ("train", "test"):
            try:
                index = load_index(data_dir, split)
            except DataError:
                continue
            for r in index:
                images[r.id] = r.image_path
                if r.label_path is not None:
                    labels[r.id] = r.label_path
    rows, probs_for_hist, first = [], [], None
    for vid, vol in load_predictions(pred_source):
        if ids is not None and vid not in ids:
            continue
        prob, binary = _to_prob(vol, postprocess)
        label = read_label(labels[vid]) if vid in labels else None
        if label is not None and label.shape != binary.shape:
            raise DataError(f"{pred_source}: prediction {vid} has shape {binary.shape}, label {label.shape}")
        row = {"id": vid, "fg": fg_fraction(binary, label), "label_fg": surface_share(label) if label is not None else None,
               "prob_std": float(prob.std()) if prob is not None else None}
        rows.append(row)
        if prob is not None:
            probs_for_hist.append(prob[::2, ::2, ::2])
        if first is None:
            first = (vid, prob, binary, label)
    if not rows:
        raise DataError(f"{pred_source}: no predictions to diagnose")
    with_labels = all(r["label_fg"] is not None for r in rows)
    prob_std = [r["prob_std"] for r in rows] if all(r["prob_std"] is not None for r in rows) else None
    verdict = collapse_verdict([r["fg"] for r in rows], [r["label_fg"] for r in rows] if with_labels else None,
                               prob_std=prob_std)
    if not figure:
        return verdict, rows, None
    fig = _figure((13, 8))
    gs = fig.add_gridspec(2, 4)
    plot_fg_histogram([r["fg"] for r in rows], [r["label_fg"] for r in rows] if with_labels else None,
                      ax=fig.add_subplot(gs[0, :2]), verdict=verdict)
    if probs_for_hist:
        plot_prob_histogram(probs_for_hist, ax=fig.add_subplot(gs[0, 2:]))
    vid, prob, binary, label = first
    zi = binary.shape[0] // 2
    panels = []
    if vid in images:
        panels.append(("image", read_volume(images[vid])[zi], "gray"))
    if label is not None:
        panels.append(("label", np.where(label[zi] == 2, 0.5, label[zi] == 1), "gray"))
    if prob is not None:
        panels.append(("probability", prob[zi], "magma"))
    panels.append(("prediction", binary[zi].astype(float), "gray"))
    for c, (name, img, cmap) in enumerate(panels[:4]):
        ax = fig.add_subplot(gs[1, c])
        ax.imshow(img, cmap=cmap)
        ax.set_title(f"{vid} z={zi}: {name}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(str(verdict), fontsize=9)
    _save(fig, out_png)
    return verdict, rows, fig
