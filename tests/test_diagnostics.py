"""Diagnostics: collapse verdicts on collapsed/healthy/empty prediction sets, figures, the diagnose CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from kaggle_utils import cli
from kaggle_utils.data import write_volume
from kaggle_utils.data import DatasetIndex, VolumeRecord
from kaggle_utils.collapse import collapse_verdict, fg_fraction, surface_share
from kaggle_utils.diagnostics import (
    diagnose,
    fold_table,
    plot_fg_histogram,
    plot_montage,
    plot_training_log,
)


def _label(shape=(12, 16, 16), seed=0) -> np.ndarray:
    """Label with a planar sheet (1), background (0) and an ignored slab (2)."""
    rng = np.random.default_rng(seed)
    lbl = np.zeros(shape, np.uint8)
    z0 = 3 + seed % 4
    lbl[z0:z0 + 2] = 1
    lbl[:, : 4 + rng.integers(0, 4)] = 2
    return lbl


def test_fg_fraction_over_labelled_voxels_only():
    lbl = np.array([[[0, 1, 2, 2]]], np.uint8)
    pred = np.array([[[0, 1, 1, 1]]], np.uint8)
    assert fg_fraction(pred) == 0.75
    assert fg_fraction(pred, lbl) == 0.5  # the two ignored voxels are left out
    assert surface_share(lbl) == 0.5
    assert np.isnan(fg_fraction(pred, np.full_like(lbl, 2)))
    with pytest.raises(ValueError, match="shape"):
        fg_fraction(pred, lbl[..., :2])


def test_collapsed_set_is_flagged_with_numbers():
    v = collapse_verdict([0.999, 0.998, 0.9988, 0.999], [0.15, 0.2, 0.12, 0.18])
    assert v.collapsed and v.kind == "foreground"
    text = str(v)
    assert "COLLAPSE" in text and "99.8" in text and "> 50%" in text


def test_ratio_rule_fires_below_half():
    v = collapse_verdict([0.45, 0.5, 0.4], [0.1, 0.12, 0.11])
    assert v.collapsed and any("x the labelled surface share" in r for r in v.reasons)


def test_healthy_set_is_not_flagged():
    label = [0.15, 0.2, 0.12, 0.18, 0.25]
    pred = [0.17, 0.22, 0.11, 0.2, 0.27]
    v = collapse_verdict(pred, label, prob_std=[0.3] * 5)
    assert not v.collapsed and v.kind == "healthy" and v.reasons == []
    assert str(v).startswith("healthy")


def test_empty_predictions_are_flagged():
    v = collapse_verdict([0.0, 0.0001, 0.0], [0.15, 0.2, 0.12])
    assert v.collapsed and v.kind == "empty"


def test_uniform_predictions_are_flagged():
    v = collapse_verdict([0.2, 0.2, 0.2, 0.2001], [0.08, 0.3, 0.15, 0.22])
    assert v.collapsed and v.kind == "uniform"


def test_constant_probabilities_are_flagged():
    v = collapse_verdict([0.15, 0.2, 0.12], [0.15, 0.2, 0.12], prob_std=[0.001, 0.002, 0.001])
    assert v.collapsed and v.kind == "constant"


def test_without_labels_uses_typical_share():
    assert collapse_verdict([0.97, 0.99]).collapsed
    # test predictions: shares of all voxels against the middle of the typical share (17.5 %);
    # healthy from 0.5x to 2x it (8.75-35 %)
    assert not collapse_verdict([0.10, 0.14, 0.09]).collapsed
    assert collapse_verdict([0.08, 0.12, 0.06]).kind == "under"  # 8.7 %: 0.50x, just under the band


def test_strong_under_prediction_is_flagged():
    """Issue 25: predicted 2.4 % against 16.2 % labelled (0.15x) was called healthy."""
    v = collapse_verdict([0.024] * 3, [0.162] * 3)
    assert v.collapsed and v.kind == "under"
    assert "0.15x the labelled surface share (2.4% vs 16.2%), limit 0.5x" in v.reasons[0]
    assert not collapse_verdict([0.09, 0.08, 0.085], [0.162] * 3).collapsed  # 0.52x: inside the band
    assert collapse_verdict([0.0001], [0.162]).kind == "empty"  # the empty kind is kept below 0.05x


def test_healthy_band_mirrors_the_over_prediction_rule():
    from kaggle_utils.collapse import COLLAPSE_MAX_RATIO, COLLAPSE_MIN_RATIO, healthy_band

    assert COLLAPSE_MIN_RATIO * COLLAPSE_MAX_RATIO == pytest.approx(1.0)
    assert healthy_band(0.162) == pytest.approx((0.081, 0.324))
    assert healthy_band(0.4) == pytest.approx((0.2, 0.5))  # capped at COLLAPSE_MAX_FG
    # the verdict is healthy exactly inside the band it reports (the band the histogram shades)
    for ref in (0.1, 0.162, 0.3):
        lo, hi = collapse_verdict([ref], [ref]).stats["healthy_band"]
        for share, healthy in ((lo * 0.99, False), (lo * 1.01, True), (hi * 0.99, True), (hi * 1.01, False)):
            assert (collapse_verdict([share], [ref]).kind == "healthy") is healthy, (ref, share)


def test_histogram_band_and_title_agree_and_say_what_the_share_is_of():
    from kaggle_utils.collapse import TYPICAL_SURFACE_SHARE, healthy_band

    fig = plot_fg_histogram([0.024, 0.025], None)  # the submit histogram: no labels
    ax = fig.axes[0]
    assert ax.get_title() == "COLLAPSE: under"
    assert "% of all voxels" in ax.get_xlabel()
    band = [p for p in ax.patches if p.get_label().startswith("healthy mean:")]
    assert len(band) == 1
    x0, x1 = band[0].get_x(), band[0].get_x() + band[0].get_width()
    lo, hi = healthy_band(sum(TYPICAL_SURFACE_SHARE) / 2)
    assert (x0, x1) == pytest.approx((100 * lo, 100 * hi))
    assert "0.5-2x the typical surface share (8.8-35.0%)" in band[0].get_label()
    fig = plot_fg_histogram([0.15, 0.17], [0.16, 0.16])
    assert fig.axes[0].get_title() == "healthy" and "% of labelled voxels" in fig.axes[0].get_xlabel()


def test_figures_are_written(tmp_path):
    out = tmp_path / "h.png"
    plot_fg_histogram([0.99, 0.98], [0.1, 0.2], out=out)
    assert out.stat().st_size > 5000
    lbl = _label()
    img = (lbl * 80).astype(np.uint8)
    plot_montage(img, lbl, prob=lbl.astype(np.float32) / 2, pred=lbl == 1, out=tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 5000
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"epoch": e, "loss": 1.0 / e, "parts": {"dice": 0.5 / e}, "val_score": 0.1 * e})
                             for e in range(1, 4)))
    plot_training_log(log, out=tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 5000


BACKEND_SCRIPT = """
import json, sys
import numpy as np
import matplotlib
from matplotlib.figure import Figure
from kaggle_utils import diagnostics as d
before = matplotlib.get_backend()
lbl = np.zeros((8, 8, 8), np.uint8); lbl[3:5] = 1; lbl[:, :2] = 2
figs = [d.plot_fg_histogram([0.2, 0.3], [0.1, 0.2]), d.plot_montage(lbl * 90, lbl),
        d.plot_prob_histogram([lbl / 2.0]), d.plot_training_log(sys.argv[1]),
        d.diagnose_figure(sys.argv[2], sys.argv[3])[2]]
print(json.dumps([before, matplotlib.get_backend(), [isinstance(f, Figure) for f in figs]]))
"""


def test_plotting_does_not_change_the_backend_and_returns_figures(tmp_path):
    # a notebook kernel runs the inline backend; switching it (matplotlib.use) silences plt.show()
    import os
    import subprocess
    import sys

    data = _dataset(tmp_path / "data")
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(4):
        np.save(preds / f"{i}.npy", np.where(_label(seed=i) == 1, 0.9, 0.05).astype(np.float16))
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"epoch": 1, "train_loss": 0.5, "val_score": 0.3}) + "\n")
    env = dict(os.environ, MPLBACKEND="svg")  # any backend that is not Agg
    out = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT, str(log), str(preds), str(data)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, are_figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert before.lower() == "svg" and after == before
    assert are_figures == [True] * 5


def test_no_module_switches_the_matplotlib_backend():
    root = Path(__file__).resolve().parents[1] / "kaggle_utils"
    offenders = [str(p) for p in root.rglob("*.py") if "matplotlib.use(" in p.read_text()]
    assert offenders == []


def _dataset(root: Path, n=4) -> Path:
    (root / "train_images").mkdir(parents=True)
    (root / "train_labels").mkdir()
    rows = ["id,scroll_id"]
    for i in range(n):
        lbl = _label(seed=i)
        write_volume(root / "train_images" / f"{i}.tif", (lbl * 90).astype(np.uint8))
        write_volume(root / "train_labels" / f"{i}.tif", lbl)
        rows.append(f"{i},{i % 2}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_diagnose_folder_collapsed_and_healthy(tmp_path):
    data = _dataset(tmp_path / "data")
    collapsed, healthy = tmp_path / "collapsed", tmp_path / "healthy"
    collapsed.mkdir(), healthy.mkdir()
    for i in range(4):
        lbl = _label(seed=i)
        np.save(collapsed / f"{i}.npy", np.full(lbl.shape, 0.97, np.float16))
        prob = np.where(lbl == 1, 0.9, 0.05).astype(np.float16)
        np.save(healthy / f"{i}.npy", prob)
    v, rows = diagnose(collapsed, data, tmp_path / "c.png")
    assert v.collapsed and v.kind == "foreground" and len(rows) == 4 and rows[0]["fg"] == 1.0
    v, rows = diagnose(healthy, data, tmp_path / "h.png")
    assert not v.collapsed, str(v)
    assert rows[0]["fg"] == pytest.approx(rows[0]["label_fg"])
    assert (tmp_path / "h.png").stat().st_size > 10000


def test_diagnose_cli_on_zip(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    zpath = tmp_path / "submission.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(4):
            path = tmp_path / f"{i}.tif"
            tifffile.imwrite(path, np.ones(_label().shape, np.uint8))
            zf.write(path, f"{i}.tif")
    assert cli.main(["diagnose", str(zpath), "--data-dir", str(data), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "COLLAPSE (foreground)" in out and "100.00" in out
    assert (tmp_path / "r.png").exists()


def test_diagnose_binarizes_probabilities_with_the_tuned_postprocessing_not_a_fixed_half(tmp_path, capsys):
    """One threshold source: a tuned threshold of 0.7 makes 0.6-probability voxels background."""
    from kaggle_utils.postprocess import PostprocessConfig, save_postprocess

    data = _dataset(tmp_path / "data")
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(4):
        lbl = _label(seed=i)
        np.save(preds / f"{i}.npy", np.where(lbl == 1, 0.9, np.where(lbl == 0, 0.6, 0.05)).astype(np.float16))
    _v, at_half = diagnose(preds, data)
    assert at_half[0]["fg"] == pytest.approx(1.0)  # every labelled voxel (0 and 1) above 0.5
    tuned = tmp_path / "tuned.yaml"
    save_postprocess(PostprocessConfig(threshold=0.7), tuned)
    _v, at_tuned = diagnose(preds, data, postprocess=tuned)
    assert at_tuned[0]["fg"] == pytest.approx(at_tuned[0]["label_fg"])
    _v, same = diagnose(preds, data, postprocess=PostprocessConfig(threshold=0.7))
    assert [r["fg"] for r in same] == [r["fg"] for r in at_tuned]
    assert cli.main(["diagnose", str(preds), "--data-dir", str(data), "--out", str(tmp_path / "r.png"),
                     "--postprocess", str(tuned)]) == 0
    row0 = capsys.readouterr().out.splitlines()[1].split()
    assert row0[0] == "0" and float(row0[1]) == pytest.approx(100 * at_tuned[0]["fg"], abs=0.01)


def test_fold_table_counts(tmp_path):
    recs = [VolumeRecord(str(i), s, tmp_path / "x.tif") for i, s in enumerate(["a", "a", "a", "b", "c", "c"])]
    folds = {"0": 0, "1": 0, "2": 0, "3": 1, "4": 1, "5": 1}
    lines = fold_table(DatasetIndex(tmp_path, "train", recs), folds).splitlines()
    assert lines[1].split() == ["a", "3", "0", "3"]
    assert lines[-1].split() == ["total", "3", "3", "6"]


def test_finished_predictions_at_2_4x_the_labelled_share_are_flagged():
    # the seed-v2 run of docs/collapse.md ends at ~2.4x the labelled surface share
    v = collapse_verdict([0.469, 0.389, 0.342], [0.164, 0.193, 0.133])
    assert v.collapsed and v.kind == "foreground"
    assert not collapse_verdict([0.198, 0.2, 0.158], [0.164, 0.193, 0.133]).collapsed


def test_diagnose_names_a_corrupt_tiff_in_the_zip(tmp_path):
    from kaggle_utils.data import DataError

    zpath = tmp_path / "submission.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("7.tif", b"not a tiff")
    with pytest.raises(DataError, match=r"submission\.zip:7\.tif: corrupt TIFF"):
        diagnose(zpath)


# ----------------------------------------------------------------------------------------------
# one rule for train and diagnose; a flagged run never heals silently
# ----------------------------------------------------------------------------------------------


def _replay(fg_shares, label=0.19):
    from kaggle_utils.collapse import CollapseGuard

    guard = CollapseGuard()
    verdicts = [guard.update(collapse_verdict([fg] * 3, [label] * 3), epoch) for epoch, fg in enumerate(fg_shares, 1)]
    return guard, verdicts


def test_guard_keeps_a_run_flagged_until_it_recovers():
    # the unseen-set case: flagged at the first validation (60.5 % vs 22.2 %), then 37-45 % (1.7-2.0x)
    guard, verdicts = _replay([0.605, 0.43, 0.37], label=0.222)
    assert [v.collapsed for v in verdicts] == [True, True, True]
    assert "not recovered" in verdicts[1].reasons[0] and "1.9x" in verdicts[1].reasons[0]
    assert "flagged since epoch 1" in verdicts[2].reasons[0] and "1.7x" in verdicts[2].reasons[0]
    assert guard.state == "collapsed" and guard.flagged_epochs == [1, 2, 3] and guard.consecutive == 3
    assert guard.should_stop() and not guard.should_stop(after=4)
    assert guard.summary().startswith("collapse guard: COLLAPSED: flagged at epoch(s) 1, 2, 3")
    # without the guard, those two validations read "healthy": what the summary used to say
    assert not collapse_verdict([0.43] * 3, [0.222] * 3).collapsed


def test_guard_recovery_is_explicit_and_the_summary_remembers():
    # the healthy run of docs/collapse.md, seed 0: a young model's thick sheets at epochs 2-3
    guard, verdicts = _replay([0.243, 0.592, 0.413, 0.246, 0.196, 0.188])
    assert [v.collapsed for v in verdicts] == [False, True, True, False, False, False]
    assert any("recovered: 1.29x <= 1.5x (flagged at epoch(s) 2, 3)" in n for n in verdicts[3].notes)
    assert guard.state == "recovered" and guard.consecutive == 0 and guard.was_flagged
    assert not guard.should_stop()
    text = guard.summary()
    assert "FLAGGED EARLIER" in text and "epoch(s) 2, 3" in text and "since epoch 4" in text and "max 3.12x" in text


def test_guard_flags_again_after_a_recovery_and_never_flagged_is_healthy():
    guard, _ = _replay([0.6, 0.2, 0.19, 0.7])
    assert guard.state == "collapsed" and guard.flagged_epochs == [1, 4] and guard.consecutive == 1
    guard, verdicts = _replay([0.25, 0.21, 0.19])
    assert guard.state == "healthy" and not guard.was_flagged
    assert guard.summary().startswith("collapse guard: healthy, never flagged in 3 validation(s)")


@pytest.mark.parametrize("ratio, collapsed", [(1.49, False), (1.5, False), (1.51, True), (1.99, True), (2.01, True)])
def test_guard_hysteresis_boundaries(ratio, collapsed):
    label = 0.2
    guard, verdicts = _replay([0.6, ratio * label], label=label)
    assert verdicts[1].collapsed is collapsed
    assert guard.state == ("collapsed" if collapsed else "recovered")


def test_guard_only_latches_foreground_flags():
    # a young model that predicts nothing ("empty") and then too much is judged by the normal rule
    guard, verdicts = _replay([0.0, 0.34, 0.2])
    assert verdicts[0].kind == "empty" and not verdicts[1].collapsed and guard.state == "recovered"


def test_guard_json_round_trip_for_resume():
    from kaggle_utils.collapse import CollapseGuard

    guard, _ = _replay([0.605, 0.45])
    data = json.loads(json.dumps(guard.to_json()))
    again = CollapseGuard.from_json(data)
    assert again.history == guard.history and again.summary() == guard.summary() and again.state == "collapsed"
    v = again.update(collapse_verdict([0.37] * 3, [0.222] * 3), 3)
    assert v.collapsed and again.flagged_epochs == [1, 2, 3]
    assert CollapseGuard.from_json(None).state == "healthy"


def test_one_rule_defaults_for_train_guard_and_diagnose():
    import inspect

    from kaggle_utils.collapse import COLLAPSE_MAX_FG, COLLAPSE_MAX_RATIO, COLLAPSE_RECOVER_RATIO

    params = inspect.signature(collapse_verdict).parameters
    assert params["max_ratio"].default == COLLAPSE_MAX_RATIO == 2.0
    assert params["recover_ratio"].default == COLLAPSE_RECOVER_RATIO == 1.5
    assert params["max_fg"].default == COLLAPSE_MAX_FG == 0.5
    v = collapse_verdict([0.36] * 3, [0.2] * 3)  # 1.8x: not flagged on its own, but noted
    assert not v.collapsed and v.notes and "above the 1.5x" in v.notes[0] and "1.8x" in str(v)
    assert collapse_verdict([0.28] * 3, [0.2] * 3).notes == []
    assert v.stats["max_ratio"] == 2.0 and v.stats["recover_ratio"] == 1.5


def test_training_curves_put_one_quantity_on_each_axis(tmp_path):
    """Issue 25: score, percentages and seconds shared one linear axis (the score flat near zero)."""
    rows = [{"epoch": e, "lr": 2e-3 * (0.5 ** e), "train_loss": 1.0 / e, "train_dice": 0.5 / e, "train_bce": 0.4 / e,
             "time_s": 200.0, "val_dice": 0.1 * e, "val_score": 0.12 * e, "val_topo": 0.05 * e, "val_sd": 0.15 * e,
             "val_voi": 0.2 * e, "val_fg_pct": 20.0 + e, "val_fg_min_pct": 15.0, "val_fg_max_pct": 30.0,
             "val_label_fg_pct": 18.0, "val_predict_s": 70.0, "collapse": "foreground" if e == 2 else "healthy"}
            for e in range(1, 5)]
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_training_log(log, out=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 5000
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert set(by_title) == {"training loss and its parts", "validation score and its parts",
                             "foreground share of labelled voxels", "learning rate"}
    score = by_title["validation score and its parts"]
    assert score.get_ylim() == (0.0, 1.0)
    assert {line.get_label() for line in score.lines} == {"score", "TopoScore", "SurfaceDice", "VOI score",
                                                          "Dice (labelled voxels)"}
    assert by_title["learning rate"].get_yscale() == "log"
    assert [line.get_label() for line in by_title["learning rate"].lines] == ["_child0"]  # lr only
    fg = by_title["foreground share of labelled voxels"]
    assert "% of labelled voxels" in fg.get_ylabel() and "collapse guard flagged" in [l.get_label() for l in fg.lines]
    loss_labels = {line.get_label() for line in by_title["training loss and its parts"].lines}
    assert loss_labels == {"total", "dice", "bce"}  # no seconds, lr or percentages among the losses
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks), ticks  # whole epochs
    # a run without validation (--fold all) says so instead of empty axes
    log.write_text("".join(json.dumps({k: r[k] for k in ("epoch", "lr", "train_loss")}) + "\n" for r in rows))
    fig = plot_training_log(log)
    assert any("no validation in this run" in t.get_text() for ax in fig.axes for t in ax.texts)
