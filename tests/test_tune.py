"""Tests of kaggle_utils.tune: known-optimum search, YAML round trip, fold guard, CLI."""

from __future__ import annotations

import json

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from kaggle_utils.config import ConfigError
from kaggle_utils.data import DataError, write_volume
from kaggle_utils.metrics import score_volume
from kaggle_utils.postprocess import PostprocessConfig, load_postprocess, postprocess, save_postprocess
from kaggle_utils.synthetic import make_volume
from kaggle_utils.tune import (
    ProbVolume,
    SearchSpace,
    load_labels,
    load_probs,
    load_search_space,
    plot_threshold_curves,
    tune,
)

TRUE_T = 0.4


def _known_prob(label: np.ndarray, seed: int) -> np.ndarray:
    """Probabilities whose ``> 0.4`` reproduces the surface label exactly, plus 1-voxel specks.

    Outside the surface, probability falls by 0.0125 per voxel of distance (0.05 per 4 voxels), so a
    threshold one grid step lower (0.35) thickens every sheet by 3 voxels on each side (further
    than SurfaceDice's tolerance of 2); inside it is 0.4 + 0.025 + 0.0125 (d - 1), so 0.45 and
    above drop the 1-2 voxel thick sheets. Isolated single voxels of probability 0.9 far from any
    sheet (only removable by dust removal) are added in labelled background.
    """
    fg = label == 1
    d_out = ndimage.distance_transform_edt(~fg)
    d_in = ndimage.distance_transform_edt(fg)
    prob = np.where(fg, TRUE_T + 0.025 + 0.0125 * (d_in - 1), TRUE_T - 0.0125 * d_out)
    prob = np.clip(prob, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    far = np.argwhere((label == 0) & (d_out > 8))
    pick = far[rng.choice(len(far), size=min(6, len(far)), replace=False)]
    prob[tuple(pick.T)] = 0.9
    return prob.astype(np.float16)


@pytest.fixture(scope="module")
def volumes():
    """Four 40^3 synthetic volumes in two scrolls / two folds, with their labels."""
    probs, labels = [], []
    for k in range(4):
        _, label = make_volume((40, 40, 40), seed=100 + k)
        # surface fragments of < 5 voxels become "ignore", so dust size 5 is exactly right
        fg = label == 1
        label[fg & ~cc3d.dust(fg, threshold=5, connectivity=26)] = 2
        labels.append(label)
        probs.append(ProbVolume(f"v{k}", "s1" if k < 2 else "s2", k % 2, _known_prob(label, k)))
    return probs, labels


SMALL_SPACE = dict(threshold={"start": 0.2, "stop": 0.6, "step": 0.05}, min_component_size=[0, 5, 1000000],
                   closing_radius=[0], fill_pinholes=[False], max_cavity_size=[0], border=[0, 3])


def test_known_optimum_found_and_yaml_round_trip(volumes, tmp_path):
    probs, labels = volumes
    space = load_search_space(data=SMALL_SPACE)
    assert len(space.threshold) == 9
    res = tune(probs, labels, space, workers=1, progress=False)
    assert res.best.threshold == pytest.approx(TRUE_T)
    assert res.best.min_component_size == 5  # removes the specks, keeps the sheets
    assert res.best_score == pytest.approx(1.0)
    # the optimum is unambiguous: every other threshold scores lower with the same settings
    t, parts = res.threshold_curve()
    assert len(t) == 9
    assert int(np.argmax(parts[:, 0])) == int(np.argmin(abs(t - TRUE_T)))
    assert np.sort(parts[:, 0])[-2] < parts[:, 0].max() - 0.01
    # first stage alone (no dust) is worse: specks cost TopoScore
    grid = [c for c in res.candidates if c.stage == "grid"]
    assert max(c.score for c in grid) < res.best_score - 0.01
    # YAML round trip: predict --postprocess reads it with load_postprocess, same scores
    out = tmp_path / "best-postprocess.yaml"
    save_postprocess(res.best, out)
    cfg = load_postprocess(out)
    assert cfg == res.best
    again = np.mean([score_volume(postprocess(p.prob.astype(np.float32), cfg), lab).score
                     for p, lab in zip(probs, labels)])
    assert again == pytest.approx(res.best_score, abs=1e-9)
    # table: every candidate with its parts; per scroll; fold guard with one row per fold
    assert res.scores.shape == (len(res.candidates), 4, 4)
    assert set(res.per_scroll) == {"s1", "s2"}
    assert res.fold_source == "sidecar"
    assert [g.fold for g in res.fold_guard] == [0, 1]
    for g in res.fold_guard:
        assert g.n_volumes == 2
        assert g.held_out_score <= g.oracle_score + 1e-12
        assert g.chosen.threshold == pytest.approx(TRUE_T)
    text = res.format_table()
    assert "fold guard" in text and "held-out" in text
    png = plot_threshold_curves(res, tmp_path / "tune.png")
    assert png.stat().st_size > 1000


def test_parallel_matches_serial_and_random_search(volumes):
    probs, labels = volumes
    space = load_search_space(data=dict(SMALL_SPACE, threshold=[0.3, 0.4, 0.5], border=[0]))
    serial = tune(probs, labels, space, workers=1, progress=False)
    par = tune(probs, labels, space, workers=2, progress=False)
    assert par.best == serial.best
    np.testing.assert_allclose(par.scores, serial.scores)
    rnd = tune(probs, labels, load_search_space(data=dict(SMALL_SPACE, threshold=[0.3, 0.4, 0.5], method="random",
                                                          n_random=6)), progress=False)
    assert rnd.best.threshold == pytest.approx(TRUE_T)
    assert rnd.best_score >= max(c.score for c in rnd.candidates if c.stage == "grid")


def test_octant_cache_gives_the_same_search_and_counts_its_reuse(volumes):
    """Dust sizes that only matter in some octants reuse the other octants' TopoScore counts; every
    number of the search is the same without the cache, serial or in two workers."""
    probs, labels = volumes
    space = load_search_space(data=dict(SMALL_SPACE, threshold=[0.35, 0.4], min_component_size=[0, 2, 5, 1000000]))
    plain = tune(probs, labels, space, workers=1, progress=False, octant_cache=False)
    cached = tune(probs, labels, space, workers=1, progress=False)
    par = tune(probs, labels, space, workers=2, progress=False)
    for res in (cached, par):
        assert res.best == plain.best and res.best_score == plain.best_score
        np.testing.assert_array_equal(res.scores, plain.scores)
    assert plain.cache["octants_reused"] == 0 and cached.cache["octants_reused"] > 0
    scored = plain.cache["octants_scored"]
    assert cached.cache["octants_reused"] + cached.cache["octants_scored"] == scored
    assert plain.cache["masks_reused"] == cached.cache["masks_reused"] > 0  # e.g. dust 0 and 2 on clean volumes


def test_chunks_keep_a_volume_together_unless_workers_would_idle():
    from kaggle_utils.tune import _chunks

    todo = [(j, i) for i in range(4) for j in range(6)]
    assert _chunks(todo, 1) == [(list(range(6)), i) for i in range(4)]
    assert _chunks(todo, 2) == [(list(range(6)), i) for i in range(4)]  # 4 volumes keep 2 workers busy
    two_vols = [(j, i) for i in (7, 9) for j in range(6)]
    assert _chunks(two_vols, 2) == [([0, 1, 2], 7), ([3, 4, 5], 7), ([0, 1, 2], 9), ([3, 4, 5], 9)]
    assert [js for js, _ in _chunks(two_vols, 4)] == [[0, 1], [2, 3], [4, 5]] * 2
    assert sorted((j, i) for js, i in _chunks(todo, 8) for j in js) == sorted(todo)


def test_hysteresis_grid(volumes):
    probs, labels = volumes
    space = load_search_space(data=dict(threshold=[0.4, 0.5], hysteresis_low=[0.3], min_component_size=[0],
                                        closing_radius=[0], fill_pinholes=[False], max_cavity_size=[0], border=[0]))
    res = tune(probs[:1], labels[:1], space, progress=False)
    hyst = [c.cfg for c in res.candidates if c.cfg.uses_hysteresis]
    assert hyst and all(c.hysteresis_low == 0.3 and c.hysteresis_high == c.threshold for c in hyst)
    assert res.fold_guard == []  # one volume: no fold to hold out


def test_search_space_yaml_errors(tmp_path):
    bad = tmp_path / "tune.yaml"
    bad.write_text("threshold: [0.3, 0.4]\ndust: [0, 100]\n")
    with pytest.raises(ConfigError, match="dust"):
        load_search_space(bad)
    bad.write_text("threshold: {start: 0.2, stop: 0.5, stepp: 0.1}\n")
    with pytest.raises(ConfigError, match="stepp"):
        load_search_space(bad)
    bad.write_text("base: {threshold: 0.3, typo: 1}\n")
    with pytest.raises(ConfigError, match="typo"):
        load_search_space(bad)
    good = tmp_path / "ok.yaml"
    good.write_text("tune:\n  threshold: [0.3, 0.35]\n  min_component_size: {start: 0, stop: 1000, step: 500}\n")
    space = load_search_space(good)
    assert space.threshold == [0.3, 0.35] and space.min_component_size == [0, 500, 1000]
    assert load_search_space().threshold == pytest.approx([0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6])


def _write_layout(root, probs, labels, fold_value=lambda p: p.fold):
    """Competition layout with the labels, and probabilities in the train/predict sidecar format."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text("id,scroll_id\n" + "".join(f"{p.id},{p.scroll_id}\n" for p in probs))
    for p, lab in zip(probs, labels):
        write_volume(root / "train_images" / f"{p.id}.tif", np.zeros_like(lab))
        write_volume(root / "train_labels" / f"{p.id}.tif", lab)
        sub = root / "run" / f"fold{p.fold}" / "oof"
        sub.mkdir(parents=True, exist_ok=True)
        np.save(sub / f"{p.id}.npy", p.prob.astype(np.float16))
        (sub / f"{p.id}.json").write_text(json.dumps(
            {"id": p.id, "scroll_id": p.scroll_id, "fold": fold_value(p), "shape": list(p.prob.shape),
             "dtype": "float16"}))


def test_load_probs_formats(volumes, tmp_path):
    probs, labels = volumes
    _write_layout(tmp_path, probs, labels)
    got = load_probs(tmp_path / "run")
    assert [p.id for p in got] == ["v0", "v1", "v2", "v3"]
    assert [p.fold for p in got] == [0, 1, 0, 1] and got[0].prob.dtype == np.float16
    assert all(np.array_equal(a.prob, b.prob) for a, b in zip(got, probs))
    labs = load_labels(tmp_path, [p.id for p in got])
    assert all(np.array_equal(a, b) for a, b in zip(labs, labels))
    with pytest.raises(DataError, match="no label"):
        load_labels(tmp_path, ["nope"])
    (tmp_path / "run" / "fold0" / "oof" / "v0.json").unlink()
    with pytest.raises(DataError, match="sidecar"):
        load_probs(tmp_path / "run")


@pytest.mark.slow
def test_cli_tune(volumes, tmp_path, capsys):
    from kaggle_utils.cli import main

    probs, labels = volumes
    # predict --save-probs of an ensemble records a list of folds: tune falls back to scroll folds
    _write_layout(tmp_path, probs, labels, fold_value=lambda p: [0, 1])
    space = tmp_path / "space.yaml"
    space.write_text("threshold: [0.35, 0.4, 0.45]\nmin_component_size: [0, 5]\nclosing_radius: [0]\n"
                     "fill_pinholes: [false]\nmax_cavity_size: [0]\nborder: [0]\n")
    out, png = tmp_path / "best-postprocess.yaml", tmp_path / "tune.png"
    rc = main(["tune", "--probs", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--space", str(space),
               "--workers", "1", "--out", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fold guard (folds from scroll_id)" in text
    cfg = load_postprocess(out)
    assert isinstance(cfg, PostprocessConfig) and cfg.threshold == pytest.approx(TRUE_T)
    assert cfg.min_component_size == 5 and png.is_file()
    space.write_text("thresholds: [0.4]\n")
    assert main(["tune", "--probs", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--space", str(space),
                 "--out", str(out)]) == 2


def test_default_space_does_not_search_the_winners_steps(volumes):
    from kaggle_utils.tune import WINNER_COORDINATES

    probs, labels = volumes
    res = tune(probs[:2], labels[:2], load_search_space(data=dict(SMALL_SPACE, threshold=[0.4])), progress=False)
    default = PostprocessConfig()
    for c in res.candidates:
        for name in WINNER_COORDINATES:
            assert getattr(c.cfg, name) == getattr(default, name), name
    rnd = tune(probs[:2], labels[:2], load_search_space(data=dict(SMALL_SPACE, threshold=[0.4], method="random",
                                                                  n_random=4)), progress=False)
    assert all(getattr(c.cfg, n) == getattr(default, n) for c in rnd.candidates for n in WINNER_COORDINATES)


def test_winners_steps_are_searched_and_chosen_when_they_help(volumes, tmp_path):
    from kaggle_utils.tune import WINNERS_SPACE

    probs, labels = volumes
    # no dust removal on offer: only z-pruning (or opening) can remove the one-voxel specks
    space = load_search_space(data=dict(threshold=[0.4], min_component_size=[0], closing_radius=[0],
                                        fill_pinholes=[False], max_cavity_size=[0], border=[0], z_prune=[False, True],
                                        hole_plug=[False, True], rounds=1))
    res = tune(probs, labels, space, progress=False)
    tried = {(c.cfg.z_prune, c.cfg.hole_plug) for c in res.candidates}
    assert {(False, False), (True, False)} <= tried
    off = next(c.score for c in res.candidates if not c.cfg.z_prune and not c.cfg.hole_plug)
    on = next(c.score for c in res.candidates if c.cfg.z_prune and not c.cfg.hole_plug)
    assert res.best_score == pytest.approx(max(c.score for c in res.candidates))
    assert res.best.z_prune == (on > off)
    out = tmp_path / "best.yaml"
    save_postprocess(res.best, out)
    assert load_postprocess(out) == res.best
    # the ready-made space loads and lists every step
    full = load_search_space(data=WINNERS_SPACE)
    assert full.sheets == [False, True] and full.split_levels == [(), (0.6, 0.7, 0.8)]
    assert "sheets" in json.dumps(WINNERS_SPACE)


def test_winners_space_yaml_ranges_and_errors(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("ridge_sigma: {start: 0.5, stop: 1.5, step: 0.5}\nclosing_z: {start: 0, stop: 2, step: 1}\n"
                    "split_levels: [[], [0.6, 0.7]]\nskeleton_threshold: [null, 0.3]\n")
    space = load_search_space(path)
    assert space.ridge_sigma == [0.5, 1.0, 1.5] and space.closing_z == [0, 1, 2]
    assert space.split_levels == [(), (0.6, 0.7)] and space.skeleton_threshold == [None, 0.3]
    path.write_text("split_levels: [[0.7, 0.6]]\n")
    with pytest.raises((ConfigError, ValueError), match="split_levels"):
        load_search_space(path)
    path.write_text("opening_radius: [-1]\n")
    with pytest.raises((ConfigError, ValueError), match="opening_radius"):
        load_search_space(path)


# ---- successive halving -------------------------------------------------------------------------


def test_halving_schedule_known_rungs():
    from kaggle_utils.tune import halving_schedule

    assert halving_schedule(27, 8, eta=3, min_volumes=1) == [(27, 1), (9, 3), (3, 8)]
    assert halving_schedule(10, 4, eta=2, min_volumes=1) == [(10, 1), (5, 2), (3, 4)]
    assert halving_schedule(10, 1, eta=2) == [(10, 1)]          # one volume: exhaustive
    assert halving_schedule(1, 5, eta=3) == [(1, 5)]            # one candidate: all volumes at once
    for c, v in halving_schedule(100, 37, eta=3, min_volumes=2):
        assert 1 <= c <= 100 and 1 <= v <= 37


def test_halving_finds_the_exhaustive_winner_with_fewer_pairs(volumes):
    """A small problem whose exhaustive winner is known (threshold 0.4 + dust 5 scores 1.0)."""
    probs, labels = volumes
    data = dict(SMALL_SPACE, threshold=[0.3, 0.35, 0.4, 0.45, 0.5], min_component_size=[0, 5], border=[0],
                n_random=40, halving_eta=2, halving_min_volumes=1)
    full = tune(probs, labels, load_search_space(data=dict(data, method="exhaustive")), progress=False)
    assert full.best.threshold == pytest.approx(TRUE_T) and full.best.min_component_size == 5
    assert full.best_score == pytest.approx(1.0)
    n_pool = len(full.candidates)
    assert full.n_tasks == n_pool * len(probs)
    half = tune(probs, labels, load_search_space(data=dict(data, method="halving")), progress=False)
    assert half.best == full.best and half.best_score == pytest.approx(full.best_score)
    assert half.n_tasks < full.n_tasks  # rungs of 1, 2, 4 volumes: far fewer (candidate, volume) pairs
    # only candidates scored on every volume are reported (the fold guard needs complete rows)
    assert np.isfinite(half.scores).all() and half.scores.shape[1] == len(probs)
    assert len(half.candidates) < n_pool
    assert half.fold_guard and all(g.n_volumes == 2 for g in half.fold_guard)


def test_halving_rejects_bad_settings():
    with pytest.raises(ValueError, match="halving_eta"):
        SearchSpace(halving_eta=1)
    with pytest.raises(ValueError, match="tune.method"):
        SearchSpace(method="bayes")  # type: ignore[arg-type]


def test_cli_tune_method_halving(volumes, tmp_path, capsys):
    from kaggle_utils.cli import main

    probs, labels = volumes
    _write_layout(tmp_path, probs, labels, fold_value=lambda p: p.fold)
    space = tmp_path / "space.yaml"
    space.write_text("threshold: [0.35, 0.4, 0.45]\nmin_component_size: [0, 5]\nclosing_radius: [0]\n"
                     "fill_pinholes: [false]\nmax_cavity_size: [0]\nborder: [0]\nn_random: 12\nhalving_eta: 2\n"
                     "halving_min_volumes: 1\n")
    out, js = tmp_path / "best-postprocess.yaml", tmp_path / "tune.json"
    assert main(["tune", "--probs", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--space", str(space),
                 "--method", "halving", "--out", str(out), "--json", str(js), "--no-progress"]) == 0
    cfg = load_postprocess(out)
    assert cfg.threshold == pytest.approx(TRUE_T) and cfg.min_component_size == 5
    stages = {c["stage"] for c in json.loads(js.read_text())["candidates"]}
    assert any(s.startswith("halving") for s in stages)


def test_cli_tune_space_winners(volumes, tmp_path):
    """``--space winners`` searches tune.WINNERS_SPACE: candidates with the winners' steps switched on are scored."""
    from kaggle_utils.cli import main

    probs, labels = volumes
    _write_layout(tmp_path, probs, labels, fold_value=lambda p: p.fold)
    out, js = tmp_path / "best-postprocess.yaml", tmp_path / "tune.json"
    assert main(["tune", "--probs", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--space", "winners",
                 "--method", "halving", "--out", str(out), "--json", str(js), "--no-progress"]) == 0
    assert isinstance(load_postprocess(out), PostprocessConfig)
    cfgs = [c["cfg"] for c in json.loads(js.read_text())["candidates"]]
    assert any(c.get("z_prune") for c in cfgs) and any(c.get("hole_plug") for c in cfgs)


def test_halving_bounds_keep_the_same_survivors_and_score_fewer_pairs(volumes):
    """Upper bounds (exact SD/VOI, TopoScore bounded) drop candidates without their full score; every rung
    keeps the candidates that scoring everything keeps, so the answer and the final table are the same."""
    probs, labels = volumes
    data = dict(SMALL_SPACE, method="halving", n_random=24, halving_min_volumes=1, halving_eta=2)
    full = tune(probs, labels, load_search_space(data=data), progress=False)  # off by default
    fast = tune(probs, labels, load_search_space(data=dict(data, halving_bounds=True)), progress=False)
    par = tune(probs, labels, load_search_space(data=dict(data, halving_bounds=True)), workers=2, progress=False)
    for res in (fast, par):
        assert res.best == full.best and res.best_score == full.best_score
        assert [c.cfg for c in res.candidates] == [c.cfg for c in full.candidates]
        np.testing.assert_array_equal(res.scores, full.scores)
    assert fast.cache["pairs_bounded"] > 0 and full.cache.get("pairs_bounded", 0) == 0
    assert fast.n_tasks < full.n_tasks, (fast.n_tasks, full.n_tasks)


def test_threshold_curve_is_optional_and_only_costs_pairs(volumes):
    probs, labels = volumes
    space = load_search_space(data=dict(SMALL_SPACE, method="halving", n_random=10, halving_min_volumes=1))
    with_curve = tune(probs, labels, space, progress=False)
    without = tune(probs, labels, space, progress=False, curve=False)
    assert without.best == with_curve.best and without.best_score == with_curve.best_score
    assert without.n_tasks < with_curve.n_tasks and len(without.candidates) < len(with_curve.candidates)
    assert len(with_curve.threshold_curve()[0]) == len(space.threshold) > len(without.threshold_curve()[0])


def test_progress_bar_counts_every_scored_pair(volumes, monkeypatch):
    from kaggle_utils.tune import _Runner

    monkeypatch.setenv("KAGGLE_UTILS_PROGRESS", "1")  # drawn although pytest's stderr is no terminal

    probs, labels = volumes
    run = _Runner([p.prob for p in probs], labels, workers=1, progress=True)
    try:
        run.evaluate([PostprocessConfig(threshold=0.4), PostprocessConfig(threshold=0.5)], "grid")
        assert run.bar.n == run.bar.total == 2 * len(probs)
    finally:
        run.close()


def test_cli_tune_shape_mismatch_is_one_line_before_any_label_is_decoded(volumes, tmp_path, capsys, monkeypatch):
    """Probabilities of another data set (v2's label 4 voxels shorter): found from the TIFF headers, before the
    search and before any label is decoded; one line naming the .npy, never a traceback."""
    import kaggle_utils.data as data_mod
    from kaggle_utils.cli import main

    probs, labels = volumes
    _write_layout(tmp_path, probs, labels)
    write_volume(tmp_path / "train_labels" / "v2.tif", labels[2][:, :, :-4].copy())
    write_volume(tmp_path / "train_images" / "v2.tif", np.zeros_like(labels[2][:, :, :-4]))

    def no_decode(path):
        raise AssertionError(f"a label was decoded: {path}")

    monkeypatch.setattr(data_mod, "read_label", no_decode)
    rc = main(["tune", "--probs", str(tmp_path / "run"), "--data-dir", str(tmp_path), "--out",
               str(tmp_path / "pp.yaml"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and "v2.npy: probability shape (40, 40, 40) != label shape (40, 40, 36)" in err
    with pytest.raises(DataError, match="v2: probability shape"):  # the library call: a DataError too
        tune(probs, [lab if k != 2 else lab[:, :, :-4] for k, lab in enumerate(labels)], progress=False)


def test_post_processing_knobs_have_one_list_of_value_rules():
    """SearchSpace searches PostprocessConfig's own fields, checked by PostprocessConfig's rules."""
    import dataclasses

    from kaggle_utils.postprocess import KNOB_RULES

    pp_fields = {f.name for f in dataclasses.fields(PostprocessConfig)}
    space_knobs = {f.name for f in dataclasses.fields(SearchSpace)} - {
        "base", "method", "rounds", "n_random", "halving_eta", "halving_min_volumes", "halving_bounds"}
    assert space_knobs <= pp_fields and set(KNOB_RULES) <= pp_fields
    for name, rule in KNOB_RULES.items():
        bad = -0.5 if rule == "non_negative" else 1.5
        with pytest.raises(ValueError, match=rf"^postprocess.{name} must be"):
            PostprocessConfig(**{name: bad})
        if name in space_knobs:
            with pytest.raises(ValueError, match=rf"^tune.{name}: values must be .*got \[{bad}\]"):
                SearchSpace(**{name: [bad]})
    assert PostprocessConfig(threshold=0.45, min_component_size=200, fill_pinholes=True).summary() == \
        "thr 0.45, dust 200, holes"
