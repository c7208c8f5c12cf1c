"""Tests for kaggle_utils.synthetic: determinism, label shares, border, layout, preview."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from kaggle_utils import synthetic
from kaggle_utils.data import (
    check_data,
    label_shares,
    load_index,
    make_folds,
    read_label,
    read_volume,
)
from kaggle_utils.synthetic import (
    BORDER,
    ScrollStyle,
    generate_dataset,
    make_volume,
    save_preview,
    scroll_style,
    smooth_field,
)

SURFACE = (0.04, 0.09)
IGNORE = (0.50, 0.70)
BACKGROUND = (0.25, 0.39)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(
        tmp_path_factory.mktemp("synth") / "data", n_train=6, n_test=2, size=64, n_scrolls=3, seed=1
    )


# ----------------------------------------------------------------------------------------------
# make_volume
# ----------------------------------------------------------------------------------------------


def test_make_volume_dtype_values_shape():
    image, label = make_volume((40, 48, 56), seed=0, style=ScrollStyle())
    assert image.shape == label.shape == (40, 48, 56)
    assert image.dtype == np.uint8 and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 2}


def test_make_volume_deterministic_and_seed_dependent():
    style = scroll_style("34117", 0)
    a_img, a_lbl = make_volume((48, 48, 48), seed=5, style=style)
    b_img, b_lbl = make_volume((48, 48, 48), seed=5, style=style)
    c_img, c_lbl = make_volume((48, 48, 48), seed=6, style=style)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lbl, b_lbl)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lbl, c_lbl)


@pytest.mark.parametrize("shape", [(64, 64, 64), (48, 64, 64), (37, 50, 41)])
def test_border_is_ignore_on_every_face(shape):
    _, label = make_volume(shape, seed=3, style=scroll_style("35360", 0))
    for axis in range(3):
        lo = np.take(label, range(BORDER), axis=axis)
        hi = np.take(label, range(shape[axis] - BORDER, shape[axis]), axis=axis)
        assert (lo == 2).all() and (hi == 2).all()
    # ...and only the border is forced: the interior holds labelled voxels next to it
    inner = label[BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER]
    assert (inner != 2).any()


@pytest.mark.parametrize("size", [64, 96])
def test_label_shares_in_competition_ranges(size):
    for i, sid in enumerate(synthetic.SCROLL_IDS):
        n_seeds = 2 if size == 64 else 1
        for seed in range(n_seeds):
            _, label = make_volume((size,) * 3, seed=100 * i + seed, style=scroll_style(sid, 0))
            s0, s1, s2 = label_shares(label)
            assert SURFACE[0] <= s1 <= SURFACE[1], (sid, seed, s0, s1, s2)
            assert IGNORE[0] <= s2 <= IGNORE[1], (sid, seed, s0, s1, s2)
            assert BACKGROUND[0] <= s0 <= BACKGROUND[1], (sid, seed, s0, s1, s2)


def test_sheets_brighter_than_background():
    for sid in synthetic.SCROLL_IDS[:4]:
        image, label = make_volume((64, 64, 64), seed=11, style=scroll_style(sid, 0))
        assert image[label == 1].mean() > image[label == 0].mean() + 20


def _distance_to_sheet(label: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(label != 1)


def test_debris_bright_voxels_outside_labels():
    # unlabelled debris: label-0 voxels far from every sheet that are as bright as the sheets
    for sid in synthetic.SCROLL_IDS[:3]:
        image, label = make_volume((64, 64, 64), seed=4, style=scroll_style(sid, 0))
        far = (label == 0) & (_distance_to_sheet(label) > 6)
        sheet_level = np.median(image[label == 1])
        assert (image[far] >= sheet_level).sum() > 50, sid
    # ...and none without debris, noise or artefacts
    quiet = ScrollStyle(debris=0.0, grain=0.0, rings=0.0, noise_sigma=0.0, drift=0.0, texture=0.0)
    image, label = make_volume((64, 64, 64), seed=4, style=quiet)
    far = (label == 0) & (_distance_to_sheet(label) > 6)
    assert (image[far] >= np.median(image[label == 1])).sum() == 0


def test_bright_body_wider_than_label():
    # the papyrus body extends 1-3 voxels beyond the labelled surface: label-0 voxels right next
    # to a sheet are clearly brighter than label-0 voxels far from any sheet
    style = ScrollStyle(debris=0.0, rings=0.0, drift=0.0)
    image, label = make_volume((64, 64, 64), seed=7, style=style)
    dist = _distance_to_sheet(label)
    near = image[(label == 0) & (dist >= 1) & (dist <= 2)].mean()
    far = image[(label == 0) & (dist >= 6)].mean()
    assert near > far + 0.25 * style.contrast


def test_style_has_hard_fields_with_defaults():
    s = scroll_style("26010", 0)
    assert 0.1 * s.contrast <= s.grain <= 0.3 * s.contrast
    assert s.body_sigma > 1.5 and s.debris > 0 and s.rings > 0
    assert ScrollStyle().body_sigma == 2.0  # new fields keep defaults


def test_sheets_are_about_two_voxels_thick():
    # label 1 without holes/ignore: thickness ~ volume / (area); estimate from a flat-ish crop:
    # count, per voxel column along the main normal, the run lengths of surface voxels
    _, label = make_volume((64, 64, 64), seed=2, style=ScrollStyle(axis_tilt=0.0, undulation=0.5))
    sheet = label == 1
    runs = []
    for line in sheet.reshape(-1, 64):  # along x
        edges = np.diff(np.r_[0, line.astype(np.int8), 0])
        runs += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    assert 1.5 <= np.median(runs) <= 4  # along x the sheet is cut obliquely, so >= normal thickness


def test_styles_differ_per_scroll_and_are_deterministic():
    a, b = scroll_style("34117", 0), scroll_style("35360", 0)
    assert a != b
    assert scroll_style("34117", 0) == a
    assert scroll_style(34117, 0) == a


def test_smooth_field_unit_variance_and_smooth():
    f = smooth_field((32, 40, 48), 8.0, np.random.default_rng(0))
    assert f.shape == (32, 40, 48) and f.dtype == np.float32
    assert 0.5 < f.std() < 1.5
    # neighbours are strongly correlated (a smooth field, not white noise)
    corr = np.corrcoef(f[:, :, :-1].ravel(), f[:, :, 1:].ravel())[0, 1]
    assert corr > 0.9


def test_make_volume_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        make_volume((8, 64, 64), seed=0)


# ----------------------------------------------------------------------------------------------
# generate_dataset
# ----------------------------------------------------------------------------------------------


def test_dataset_layout_loads_and_checks(dataset):
    train = load_index(dataset, "train")
    test = load_index(dataset, "test")
    assert len(train) == 6 and len(test) == 2
    assert all(r.id.isdigit() and r.scroll_id.isdigit() and len(r.scroll_id) == 5 for r in train)
    rows = check_data(dataset)
    assert len(rows) == 8
    assert all(not r["problems"] for r in rows)
    for r in rows:
        if r["split"] == "train":
            assert SURFACE[0] <= r["share1"] <= SURFACE[1]
            assert IGNORE[0] <= r["share2"] <= IGNORE[1]


def test_dataset_mixed_shapes_and_scrolls(dataset):
    index = load_index(dataset, "train")
    shapes = {read_volume(r.image_path).shape for r in index}
    assert (64, 64, 64) in shapes
    assert (48, 48, 48) in shapes  # 0.8 * 64 rounded down to a multiple of 8
    assert any(len(set(s)) > 1 for s in shapes)  # non-cubic
    assert len(index.scroll_ids) == 3
    folds = make_folds(index, n_folds=3)
    assert set(folds.values()) == {0, 1, 2}
    for r in index:  # labels match their images
        assert read_label(r.label_path).shape == read_volume(r.image_path).shape


def test_dataset_deterministic(tmp_path):
    kw = dict(n_train=3, n_test=1, size=32, n_scrolls=2)
    a = generate_dataset(tmp_path / "a", seed=4, **kw)
    b = generate_dataset(tmp_path / "b", seed=4, **kw)
    c = generate_dataset(tmp_path / "c", seed=5, **kw)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_dataset_rerun_replaces_stale_files(tmp_path):
    generate_dataset(tmp_path, n_train=3, n_test=1, size=32, n_scrolls=2, seed=0)
    generate_dataset(tmp_path, n_train=2, n_test=1, size=32, n_scrolls=2, seed=1)
    assert len(load_index(tmp_path, "train")) == 2  # no orphan files of the first run


def test_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        generate_dataset(tmp_path, size=8)
    with pytest.raises(ValueError, match="n_train"):
        generate_dataset(tmp_path, n_train=0)
    with pytest.raises(ValueError, match=r"size must be <= 512.*got 513"):
        generate_dataset(tmp_path, size=513)
    for kw, what in [({"n_test": -1}, "n_test must be >= 0"), ({"n_scrolls": 0}, "n_scrolls must be >= 1")]:
        with pytest.raises(ValueError, match=what):
            generate_dataset(tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()  # checked before anything is written


def test_save_preview_writes_png(dataset, tmp_path):
    png = save_preview(dataset, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ids = load_index(dataset, "train").ids[:1]
    png2 = save_preview(dataset, tmp_path / "q.png", ids=ids)
    assert png2.stat().st_size > 1000


def test_hidden_test_labels_for_local_scoring(tmp_path):
    from kaggle_utils.data import load_index, read_label, read_volume

    root = synthetic.generate_dataset(tmp_path / "d", n_train=2, n_test=2, size=32, n_scrolls=2, seed=3)
    test = load_index(root, "test")
    for rec in test:
        label = read_label(root / "test_labels" / f"{rec.id}.tif")
        assert label.shape == read_volume(rec.image_path).shape
    bare = synthetic.generate_dataset(tmp_path / "e", n_train=2, n_test=1, size=32, n_scrolls=2, seed=3, test_labels=False)
    assert not (bare / "test_labels").exists()
