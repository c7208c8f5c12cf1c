"""Tests of kaggle_utils.metrics: the official scorer's reference cases, known answers, properties, CLI."""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from kaggle_utils.cli import main as cli_main
from kaggle_utils.data import DataError
from kaggle_utils.metrics import (
    DatasetScore,
    GroundTruthCache,
    VolumeScore,
    preprocess,
    score_bound,
    score_dataset,
    score_volume,
    surface_dice,
    topo_counts,
    voi,
)
from kaggle_utils.metrics.surface_dice import neighbour_codes, surfel_area_table
from kaggle_utils.metrics.voi import conditional_entropies

REF_DIR = Path(__file__).parent / "data" / "metric_reference"
REFERENCE = json.loads((REF_DIR / "official.json").read_text())
PARTS = ("score", "topo_score", "surface_dice", "voi_score", "voi_split", "voi_merge")


def _reference_pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name.startswith("extra_"):
        return tifffile.imread(REF_DIR / f"{name}_pred.tif"), tifffile.imread(REF_DIR / f"{name}_gt.tif")
    return tifffile.imread(REF_DIR / f"pred_{name}.tif"), tifffile.imread(REF_DIR / "gt.tif")


def _sheets(shape=(24, 24, 24), seed=0, ignore=True) -> np.ndarray:
    """Label volume with two wavy 2-voxel sheets, an ignore border and an ignore slab."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    for base in (shape[0] // 3, 2 * shape[0] // 3):
        phase = rng.uniform(0, 6)
        surf = base + 1.5 * np.sin(x / 4.0 + phase) + 0.05 * y
        lab[(z >= surf) & (z < surf + 2)] = 1
    if ignore:
        lab[:, :, -4:] = 2
        lab[:2], lab[-2:] = 2, 2
    return lab


# ----------------------------------------------------------------------------------------------
# the official scorer's outputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_case_matches_official(name):
    pred, gt = _reference_pair(name)
    ref = REFERENCE[name]
    got = score_volume(pred, gt)
    for part in PARTS:
        assert getattr(got, part) == pytest.approx(ref[part], abs=1e-6), part
    assert got.to_json()["topo_counts"] == {k: list(v) for k, v in ref["topo_counts_by_dim_m_p_g"].items()}
    for k, f1 in ref["topoF1_by_dim"].items():
        assert got.topo_f1[int(k)] == (None if f1 is None else pytest.approx(f1, abs=1e-9))


@pytest.mark.parametrize("name", ["shift_z3", "extra_random_blobs", "all_foreground"])
def test_reference_parts_directly(name):
    pred, gt = _reference_pair(name)
    pb, gb = preprocess(pred, gt)
    ref = REFERENCE[name]
    assert surface_dice(pb, gb) == pytest.approx(ref["surface_dice"], abs=1e-6)
    v = voi(pb, gb)
    assert (v.split, v.merge, v.score) == pytest.approx((ref["voi_split"], ref["voi_merge"], ref["voi_score"]), abs=1e-6)
    assert {k: list(c) for k, c in topo_counts(pb, gb).items()} == {
        int(k): c for k, c in ref["topo_counts_by_dim_m_p_g"].items()
    }


# ----------------------------------------------------------------------------------------------
# Surface Dice: lookup table and known answers
# ----------------------------------------------------------------------------------------------


def test_area_table_known_cells():
    t = surfel_area_table((1.0, 1.0, 1.0))
    assert t[0] == 0 and t[255] == 0
    assert t[1] == pytest.approx(math.sqrt(3) / 8)  # one corner cut off
    assert t[128] == pytest.approx(math.sqrt(3) / 8)
    assert t[0b00000011] == pytest.approx(math.sqrt(2) / 2)  # two voxels: a slanted rectangle
    assert t[0b00001111] == pytest.approx(1.0)  # half the cell: a flat unit square
    assert t[0b01010101] == pytest.approx(1.0)
    assert t[0b00000111] == pytest.approx(0.5 + 3 * math.sqrt(3) / 8)  # the reference's triangulation
    assert np.allclose(surfel_area_table((2.0, 2.0, 2.0)), 4 * t)
    # a flat half-cell normal to axis 0 scales with the spacing of the two other axes
    assert surfel_area_table((5.0, 2.0, 3.0))[0b00001111] == pytest.approx(6.0)


def test_neighbour_codes_single_voxel():
    m = np.zeros((1, 1, 1), bool)
    m[0, 0, 0] = True
    codes = neighbour_codes(m)
    assert codes.shape == (2, 2, 2)
    # the voxel is offset (1,1,1) of corner (0,0,0) (weight 1) and offset (0,0,0) of corner (1,1,1)
    assert codes[0, 0, 0] == 1 and codes[1, 1, 1] == 128
    assert sorted(codes.ravel().tolist()) == [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("shift, expected", [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.5), (5, 0.0)])
def test_surface_dice_shifted_plane(shift, expected):
    gt = np.zeros((20, 12, 12), bool)
    pred = np.zeros_like(gt)
    gt[6] = True
    pred[6 + shift] = True
    assert surface_dice(pred, gt, tau=2.0) == pytest.approx(expected, abs=1e-12)


def test_surface_dice_empty_cases():
    empty = np.zeros((8, 8, 8), bool)
    full = empty.copy()
    full[2:5, 2:5, 2:5] = True
    assert surface_dice(empty, empty) == 1.0
    assert surface_dice(full, empty) == 0.0
    assert surface_dice(empty, full) == 0.0
    assert surface_dice(full, full) == 1.0


def test_surface_dice_spacing_and_tau():
    gt = np.zeros((20, 10, 10), bool)
    pred = np.zeros_like(gt)
    gt[6], pred[9] = True, True
    assert surface_dice(pred, gt, tau=2.0) == pytest.approx(0.5)
    # the shift is 3 voxels along z: with z spacing 0.5 it is within tolerance
    assert surface_dice(pred, gt, tau=2.0, spacing=(0.5, 1.0, 1.0)) == pytest.approx(1.0)
    assert surface_dice(pred, gt, tau=3.0) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# VOI: known answers
# ----------------------------------------------------------------------------------------------


def test_conditional_entropies_known():
    a = np.array([0, 0, 1, 1])
    b = np.array([0, 1, 2, 3])
    h_ab, h_ba = conditional_entropies(a, b)
    assert h_ab == pytest.approx(0.0) and h_ba == pytest.approx(1.0)
    assert conditional_entropies(np.array([], int), np.array([], int)) == (0.0, 0.0)
    # sparse path (many labels) agrees with the dense one
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5000, 3000), rng.integers(0, 7, 3000)
    h = conditional_entropies(a, b)
    ha = -sum((np.sum((a == i) & (b == j)) / 3000) * math.log2(np.sum((a == i) & (b == j)) / np.sum(b == j))
              for j in range(7) for i in np.unique(a[b == j]))
    assert h[0] == pytest.approx(ha, abs=1e-9)


def test_voi_split_merge_directions():
    gt = np.zeros((5, 5, 21), bool)
    gt[2, 2, :] = True  # one bar
    pred = gt.copy()
    pred[2, 2, 10] = False  # cut in two halves of 10 voxels; the cut voxel has pred label 0
    v = voi(pred, gt, alpha=0.3)
    p = np.array([10, 10, 1]) / 21
    assert v.split == pytest.approx(-(p * np.log2(p)).sum())  # H(pred | gt): gt is one label
    assert v.merge == pytest.approx(0.0)
    assert v.score == pytest.approx(1 / (1 + 0.3 * v.voi))
    swapped = voi(gt, pred)
    assert (swapped.split, swapped.merge) == pytest.approx((v.merge, v.split))


def test_voi_26_connectivity_and_empty():
    gt = np.zeros((6, 6, 6), bool)
    gt[1, 1, 1] = gt[2, 2, 2] = True  # diagonal neighbours: one 26-connected component
    assert voi(np.zeros_like(gt), gt).voi == pytest.approx(0.0)  # empty vs one component
    assert voi(np.zeros_like(gt), np.zeros_like(gt)) == (0.0, 0.0, 0.0, 1.0)
    two = np.zeros_like(gt)
    two[1, 1, 1] = two[4, 4, 4] = True
    v = voi(np.zeros_like(gt), two)
    assert (v.split, v.merge) == pytest.approx((0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# preprocessing and score_volume edge cases
# ----------------------------------------------------------------------------------------------


def test_both_empty_and_everything_ignored():
    z = np.zeros((16, 16, 16), np.uint8)
    s = score_volume(z, z)
    assert (s.score, s.topo_score, s.surface_dice, s.voi_score) == pytest.approx((1.0, 1.0, 1.0, 1.0), abs=1e-12)
    rng = np.random.default_rng(0)
    junk = (rng.random(z.shape) < 0.3).astype(np.uint8)
    s = score_volume(junk, np.full_like(z, 2))
    assert s.score == pytest.approx(1.0, abs=1e-12)


def test_one_empty():
    gt = _sheets(ignore=False)
    s = score_volume(np.zeros_like(gt), gt)
    assert s.surface_dice == 0.0 and s.topo_score == 0.0 and 0 < s.score < 0.35
    s = score_volume(gt, np.zeros_like(gt))
    assert s.surface_dice == 0.0


def test_foreground_rules_values_nan():
    gt = _sheets(seed=3)
    pred = (gt == 1).astype(np.uint8)
    pred[5:8, 3:9, 4:7] = 1  # a blob, partly outside the sheets
    base = score_volume(pred, gt).to_json()
    assert score_volume(pred * 255, gt).to_json() == base
    assert score_volume(pred * 2, gt).to_json() == base  # a predicted 2 is foreground
    soft = pred.astype(np.float32) * 0.01  # any non-zero value is foreground
    assert score_volume(soft, gt).to_json() == base
    nan = soft.copy()
    nan[pred == 0] = np.nan  # NaN counts as background
    assert score_volume(nan, gt).to_json() == base
    pb, gb = preprocess(nan, gt)
    assert pb.dtype == bool and gb.dtype == bool
    assert not pb[gt == 2].any() and not gb[gt == 2].any()
    assert gb.sum() == (gt == 1).sum()


def test_identical_scores_one():
    gt = _sheets(seed=1)
    s = score_volume(gt, gt)  # raw labels incl. 2: ignored voxels are removed from both
    assert s.score == pytest.approx(1.0) and s.voi_split == 0.0 and s.voi_merge == 0.0


def test_ignored_voxels_do_not_matter():
    gt = _sheets(seed=2)
    rng = np.random.default_rng(2)
    pred = (gt == 1).astype(np.uint8)
    pred[rng.random(gt.shape) < 0.01] = 1
    base = score_volume(pred, gt)
    junk = pred.copy()
    ign = gt == 2
    junk[ign] = (rng.random(int(ign.sum())) < 0.5).astype(np.uint8)
    assert score_volume(junk, gt) == base


def test_axis_swap_leaves_sd_and_voi():
    gt = _sheets(shape=(20, 26, 22), seed=4)
    rng = np.random.default_rng(4)
    pred = np.roll(gt == 1, 1, axis=0).astype(np.uint8)
    pred[rng.random(gt.shape) < 0.005] = 1
    pb, gb = preprocess(pred, gt)
    sd, v = surface_dice(pb, gb), voi(pb, gb)
    for axes in [(2, 1, 0), (1, 0, 2), (0, 2, 1)]:
        pt, gtt = np.transpose(pb, axes), np.transpose(gb, axes)
        assert surface_dice(pt, gtt) == pytest.approx(sd, abs=1e-12)
        assert voi(pt, gtt) == pytest.approx(v, abs=1e-12)


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        preprocess(np.zeros((4, 5, 6)), np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        score_volume(np.zeros((4, 5, 6)), np.zeros((4, 5, 7)))


def test_backends():
    gt = _sheets()
    with pytest.raises(ValueError, match="backend"):
        score_volume(gt, gt, backend="nope")
    try:
        import topometrics  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="not installed"):
            score_volume(gt, gt, backend="official")


def test_to_json_layout():
    gt = _sheets()
    j = score_volume(gt, gt).to_json()
    assert list(j) == [*PARTS, "topo_counts"]
    assert set(j["topo_counts"]) == {"0", "1", "2"}
    assert all(isinstance(x, int) for c in j["topo_counts"].values() for x in c)
    json.dumps(j)


# ----------------------------------------------------------------------------------------------
# datasets and CLI
# ----------------------------------------------------------------------------------------------


def _write_dataset(tmp_path: Path, n=3) -> tuple[Path, Path, dict[str, VolumeScore]]:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    expected = {}
    for i in range(n):
        vid = f"{1000 + i}"
        gt = _sheets(seed=10 + i)
        pred = np.roll(gt == 1, i, axis=0).astype(np.uint8)
        tifffile.imwrite(gt_dir / f"{vid}.tif", gt)
        tifffile.imwrite(pred_dir / f"{vid}.tif", pred)
        expected[vid] = score_volume(pred, gt)
    return pred_dir, gt_dir, expected


def test_score_dataset_folder_zip_layout(tmp_path):
    pred_dir, gt_dir, expected = _write_dataset(tmp_path)
    res = score_dataset(pred_dir, gt_dir, progress=False)
    assert isinstance(res, DatasetScore)
    assert res.volumes == expected
    assert res.mean == pytest.approx(np.mean([v.score for v in expected.values()]))

    zpath = tmp_path / "submission.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(pred_dir.iterdir()):
            buf = io.BytesIO()
            tifffile.imwrite(buf, tifffile.imread(f))
            zf.writestr(f.name, buf.getvalue())
    assert score_dataset(zpath, gt_dir, progress=False).volumes == expected

    layout = tmp_path / "comp"
    (layout / "train_labels").mkdir(parents=True)
    for f in gt_dir.iterdir():
        (layout / "train_labels" / f.name).write_bytes(f.read_bytes())
    one = score_dataset(pred_dir / "1001.tif", layout, progress=False)
    assert list(one.volumes) == ["1001"] and one.volumes["1001"] == expected["1001"]
    single = score_dataset(pred_dir / "1002.tif", gt_dir / "1002.tif", progress=False)
    assert single.volumes["1002"] == expected["1002"]


def test_score_dataset_missing_ids(tmp_path):
    pred_dir, gt_dir, _ = _write_dataset(tmp_path)
    (pred_dir / "1001.tif").unlink()
    with pytest.raises(DataError, match="1001"):
        score_dataset(pred_dir, gt_dir, progress=False)
    with pytest.raises(DataError, match="no prediction: 1001"):
        score_dataset(pred_dir, gt_dir, ids=["1000", "1001"], progress=False)
    with pytest.raises(DataError, match="no ground truth: 77"):
        score_dataset(pred_dir, gt_dir, ids=["77"], progress=False)


def test_score_dataset_shape_mismatch_names_volume(tmp_path):
    pred_dir, gt_dir, _ = _write_dataset(tmp_path, n=1)
    tifffile.imwrite(pred_dir / "1000.tif", np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(DataError, match=r"1000.*\(5, 6, 7\).*\(24, 24, 24\)"):
        score_dataset(pred_dir, gt_dir, progress=False)


def test_cli_score_json_round_trip(tmp_path, capsys):
    pred_dir, gt_dir, expected = _write_dataset(tmp_path)
    assert cli_main(["score", str(pred_dir), str(gt_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "mean": pytest.approx(np.mean([v.score for v in expected.values()])),
        "volumes": {k: v.to_json() for k, v in expected.items()},
    }
    zpath = tmp_path / "submission.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in pred_dir.iterdir():
            zf.write(f, arcname=f.name)
    assert cli_main(["score", str(zpath), str(gt_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["volumes"] == out["volumes"]
    assert cli_main(["score", str(zpath), str(gt_dir)]) == 0
    table = capsys.readouterr().out
    assert "1002" in table and "mean" in table


def test_cli_score_errors(tmp_path, capsys):
    pred_dir, gt_dir, _ = _write_dataset(tmp_path, n=1)
    assert cli_main(["score", str(tmp_path / "nope"), str(gt_dir)]) == 2
    assert "not found" in capsys.readouterr().err
    rc = cli_main(["score", str(pred_dir), str(gt_dir), "--backend", "official"])
    try:
        import topometrics  # noqa: F401
    except ImportError:
        assert rc == 2 and "not installed" in capsys.readouterr().err


@pytest.mark.slow
def test_score_dataset_workers(tmp_path):
    pred_dir, gt_dir, expected = _write_dataset(tmp_path, n=2)
    res = score_dataset(pred_dir, gt_dir, workers=2, progress=False)
    assert res.volumes == expected


@pytest.mark.parametrize("spacing, tau", [((1.0, 1.0, 1.0), 2.0), ((1.0, 1.0, 1.0), 1.0), ((1.0, 2.0, 3.0), 2.5),
                                          ((0.5, 1.5, 1.0), 2.0), ((0.7, 0.7, 0.7), 1.4)])
def test_tolerance_ball_equals_distance_transform(spacing, tau):
    from scipy.ndimage import distance_transform_edt

    from kaggle_utils.metrics.surface_dice import _within_tolerance

    rng = np.random.default_rng(7)
    borders = rng.random((13, 11, 17)) < 0.02
    borders[6, 5, 8] = True
    expected = distance_transform_edt(~borders, sampling=spacing) <= tau  # what the reference does
    np.testing.assert_array_equal(_within_tolerance(borders, tau, spacing), expected)


def test_joint_counts_sparse_and_chunked_paths_agree(monkeypatch):
    import importlib

    voi_mod = importlib.import_module("kaggle_utils.metrics.voi")  # the package's `voi` is the function

    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 300, (7, 9, 11)), rng.integers(0, 40, (7, 9, 11))
    dense = voi_mod.joint_counts(a, b, drop_background_pair=True)
    h = voi_mod.conditional_entropies(a.ravel(), b.ravel())
    monkeypatch.setattr(voi_mod, "_DENSE_MAX_BINS", 0)
    monkeypatch.setattr(voi_mod, "_CHUNK", 50)
    sparse = voi_mod.joint_counts(a, b, drop_background_pair=True)
    for x, y in zip(dense, sparse):
        np.testing.assert_array_equal(x, y)
    assert voi_mod.conditional_entropies(a.ravel(), b.ravel()) == pytest.approx(h, abs=1e-12)
    assert int(dense[1].sum()) == int(((a != 0) | (b != 0)).sum())  # (0, 0) pairs dropped


def test_single_prediction_file_against_label_folder(tmp_path):
    pred_dir, gt_dir, expected = _write_dataset(tmp_path)
    res = score_dataset(pred_dir / "1001.tif", gt_dir, progress=False)
    assert res.volumes == {"1001": expected["1001"]}


# ----------------------------------------------------------------------------------------------
# inputs the official scorer accepts silently: same numbers, one warning line each
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, needles", [
    (np.array([[[0, 1]]], np.uint8), []),
    (np.array([[[False, True]]]), []),
    (np.array([[[0, 255]]], np.uint8), ["not binary (values 0..255)"]),
    (np.array([[[0, 1]]], np.uint16), ["unexpected dtype uint16"]),
    (np.array([[[0.0, 1.0]]], np.float32), ["unexpected dtype float32"]),
    (np.array([[[0.0, 0.25, 0.75]]], np.float32), ["unexpected dtype float32", "not binary (values 0..0.75)"]),
    (np.array([[[0.0, np.nan, 1.0]]], np.float64), ["not binary (values 0..1, NaN)"]),
    (np.array([[[-1, 0, 1]]], np.int8), ["unexpected dtype int8", "not binary (values -1..1)"]),
])
def test_prediction_warnings_one_line_naming_the_file(pred, needles):
    from kaggle_utils.metrics.score import prediction_warnings

    lines = prediction_warnings(pred, "sub.zip:7.tif")
    if not needles:
        assert lines == []
        return
    assert len(lines) == 1 and lines[0].startswith("sub.zip:7.tif: ")
    assert all(n in lines[0] for n in needles), lines[0]


def test_score_dataset_warns_but_keeps_the_numbers(tmp_path):
    pred_dir, gt_dir, expected = _write_dataset(tmp_path, n=2)
    clean = score_dataset(pred_dir, gt_dir, progress=False)
    assert clean.warnings == () and "warnings" not in clean.to_json()
    zpath = tmp_path / "nested.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(pred_dir.iterdir()):
            buf = io.BytesIO()
            tifffile.imwrite(buf, tifffile.imread(f).astype(np.float32) * 0.9)  # soft, in a folder
            zf.writestr(f"out/{f.name}", buf.getvalue())
    res = score_dataset(zpath, gt_dir, progress=False)
    assert res.volumes == expected
    assert len(res.warnings) == 4  # per volume: one nested entry, one dtype/values line
    assert sum("inside a folder" in w for w in res.warnings) == 2
    assert sum("float32" in w and "not binary" in w for w in res.warnings) == 2
    assert res.to_json()["warnings"] == list(res.warnings)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_read_located_never_returns_part_of_a_truncated_tiff(tmp_path, compression):
    """Every cut of a multi-page TIFF is a one-line 'corrupt TIFF' error or the complete volume."""
    from kaggle_utils.submission import read_located

    vol = (np.random.default_rng(0).random((6, 8, 8)) > 0.7).astype(np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(buf, vol, photometric="minisblack", compression=compression)
    data = buf.getvalue()
    zpath = tmp_path / "cut.zip"
    n_errors = 0
    for cut in range(0, len(data), 3):
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.writestr("v.tif", data[:cut])
        try:
            got = read_located(("zip", str(zpath), "v.tif"))
        except DataError as exc:
            msg = str(exc)
            assert "\n" not in msg and msg.startswith(f"{zpath}:v.tif: corrupt TIFF")
            n_errors += 1
            continue
        np.testing.assert_array_equal(got, vol)
    assert n_errors > 0


# ----------------------------------------------------------------------------------------------
# Ground-truth cache: what depends on the labels alone, computed once per volume
# ----------------------------------------------------------------------------------------------


def test_gt_cache_changes_nothing_on_the_reference_cases():
    """Every prediction of the 128^3 reference set scored through one shared cache: bit-identical."""
    gt = tifffile.imread(REF_DIR / "gt.tif")
    cache = GroundTruthCache()
    names = [n for n in sorted(REFERENCE) if not n.startswith("extra_")]
    for name in names:
        pred = tifffile.imread(REF_DIR / f"pred_{name}.tif")
        assert score_volume(pred, gt, gt_cache=cache) == score_volume(pred, gt), name
    assert cache.topo_forms is not None and cache.surface is not None and cache.voi_labels is not None


@pytest.mark.parametrize("seed", range(4))
def test_gt_cache_changes_nothing_on_random_predictions(seed):
    """Random GT (odd shape, ignore label) and predictions that leave the GT's bounding box, are
    empty or are everything: score_volume and score_bound equal with and without the cache."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(17, 30, size=3))
    gt = _sheets(shape, seed=seed)
    gt[rng.random(shape) < 0.01] = 1
    cache = GroundTruthCache()
    preds = [np.zeros(shape, np.uint8), np.ones(shape, np.uint8), (rng.random(shape) < 0.02).astype(np.uint8),
             np.roll(gt == 1, 1, axis=0).astype(np.uint8)]
    small = np.zeros(shape, np.uint8)
    small[1:4, 1:4, 1:4] = 1  # far from the GT: another crop box than the GT's
    preds.append(small)
    for i, pred in enumerate(preds):
        assert score_volume(pred, gt, gt_cache=cache) == score_volume(pred, gt), i
        assert score_bound(pred, gt, gt_cache=cache) == score_bound(pred, gt), i
    empty = np.zeros(shape, np.uint8)
    assert score_volume(preds[2], empty, gt_cache=GroundTruthCache()) == score_volume(preds[2], empty)
    with pytest.raises(ValueError, match="gt_cache"):
        score_volume(preds[2], np.roll(gt, 3, axis=1), gt_cache=cache)
