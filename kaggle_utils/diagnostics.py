"""Diagnostics: catch a collapsed model at a glance.

The figures (:func:`plot_fg_histogram`, :func:`plot_montage`, :func:`plot_training_log`,
:func:`plot_prob_histogram`), a data overview (:func:`fold_table`) and :func:`diagnose`, which judges
finished predictions. The collapse rule itself (:func:`~kaggle_utils.collapse.collapse_verdict`,
:class:`~kaggle_utils.collapse.CollapseGuard`, the thresholds, :func:`~kaggle_utils.collapse.fg_fraction`)
lives in :mod:`kaggle_utils.collapse`, which training uses too.

Shares are measured over **labelled** voxels (label != ignore) when labels are known: there the
surface share is about 9-26 % (surface 4-9 % of all voxels, background 25-39 %). Without labels
(test predictions) they are shares of the whole volume and are compared with
:data:`~kaggle_utils.collapse.TYPICAL_SURFACE_SHARE`, the same labelled-voxel share.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from .collapse import (COLLAPSE_MAX_RATIO, COLLAPSE_MIN_RATIO, CollapseVerdict, collapse_verdict, fg_fraction,
                       healthy_band, surface_share)
from .data import DataError, load_index, read_label, read_volume
from .moved import moved_name_error

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .postprocess import PostprocessConfig

__all__ = [
    "plot_fg_histogram",
    "plot_montage",
    "plot_training_log",
    "plot_prob_histogram",
    "load_predictions",
    "diagnose",
    "diagnose_figure",
    "fold_table",
]


#: Public names that moved out of this module (:func:`kaggle_utils.moved.moved_name_error`).
MOVED = {n: "kaggle_utils.collapse" for n in ("TYPICAL_SURFACE_SHARE", "COLLAPSE_MAX_RATIO", "COLLAPSE_RECOVER_RATIO", "COLLAPSE_MAX_FG",
                                         "COLLAPSE_MIN_RATIO", "COLLAPSE_STOP_AFTER", "healthy_band", "CollapseVerdict",
                                         "CollapseGuard", "fg_fraction", "surface_share", "collapse_verdict")}


def __getattr__(name: str) -> object:
    """A one-line ``AttributeError`` naming the new home of a name in :data:`MOVED`."""
    raise moved_name_error(__name__, name, MOVED)


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

    The shaded band is where the verdict's mean predicted share is healthy (:func:`~kaggle_utils.collapse.healthy_band`:
    :data:`COLLAPSE_MIN_RATIO` to :data:`COLLAPSE_MAX_RATIO` x the reference share); the dashed line
    is that mean, so title, band and bars agree.

    Args:
        pred_fg: predicted foreground share per volume (0-1).
        label_fg: labelled surface share of the same volumes (shares of labelled voxels); ``None``:
            test predictions (shares of all voxels), judged against :data:`~kaggle_utils.collapse.TYPICAL_SURFACE_SHARE`.
        out: also write the figure as PNG here.
        ax: draw into these axes (of another figure) instead of a new figure.
        verdict: the verdict shown in the title; default :func:`~kaggle_utils.collapse.collapse_verdict` of the shares.

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
