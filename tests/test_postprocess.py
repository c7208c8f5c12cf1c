"""Tests for kaggle_utils.postprocess on hand-built volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from kaggle_utils.config import ConfigError
from kaggle_utils.postprocess import (
    PostprocessConfig,
    binary_closing,
    fill_cavities,
    fill_pinholes,
    hysteresis_threshold,
    load_postprocess,
    postprocess,
    remove_small_components,
    save_postprocess,
    zero_border,
)


def _empty(shape=(12, 12, 12), dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


# ---------------------------------------------------------------------------------- threshold


def test_threshold_boundary_is_strict():
    prob = _empty((1, 1, 5))
    prob[0, 0] = [0.0, 0.49, 0.5, 0.51, 1.0]
    out = postprocess(prob, PostprocessConfig(threshold=0.5))
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0, 1, 1])


def test_output_dtype_shape_values():
    rng = np.random.default_rng(0)
    prob = rng.random((7, 9, 11), dtype=np.float32)
    cfg = PostprocessConfig(threshold=0.3, min_component_size=3, fill_pinholes=True,
                            max_cavity_size=5, closing_radius=1, border=1)
    out = postprocess(prob, cfg)
    assert out.dtype == np.uint8
    assert out.shape == prob.shape
    assert set(np.unique(out)) <= {0, 1}


def test_default_config_is_threshold_only():
    prob = _empty()
    prob[5, 5, 5] = 0.9  # a single voxel survives: no dust removal by default
    out = postprocess(prob)
    assert out.sum() == 1 and out[5, 5, 5] == 1


def test_rejects_non_3d():
    with pytest.raises(ValueError, match="3D"):
        postprocess(np.zeros((4, 4), np.float32))


# ---------------------------------------------------------------------------------- hysteresis


def test_hysteresis_keeps_weak_component_touching_strong_voxel():
    prob = _empty()
    prob[2, 2, 1:8] = 0.4          # weak bar ...
    prob[2, 2, 8] = 0.95           # ... ending in one strong voxel
    prob[3, 3, 9] = 0.4            # diagonal (26-) neighbour of the strong voxel: same component
    prob[8, 8, 2:7] = 0.4          # weak isolated bar: dropped
    out = hysteresis_threshold(prob, low=0.3, high=0.9)
    assert out[2, 2, 1:9].all()
    assert out[3, 3, 9]
    assert not out[8, 8].any()
    assert out.sum() == 9


def test_hysteresis_via_config_ignores_threshold():
    prob = _empty()
    prob[2, 2, 1:8] = 0.4
    prob[2, 2, 8] = 0.95
    out = postprocess(prob, PostprocessConfig(threshold=0.9, hysteresis_low=0.3, hysteresis_high=0.9))
    assert out.sum() == 8


def test_hysteresis_needs_both_bounds_in_order():
    with pytest.raises(ValueError, match="together"):
        PostprocessConfig(hysteresis_low=0.2)
    with pytest.raises(ValueError, match=">="):
        PostprocessConfig(hysteresis_low=0.6, hysteresis_high=0.4)


# ---------------------------------------------------------------------------------- dust


def test_dust_removal_by_size_with_26_connectivity():
    mask = _empty(dtype=bool)
    # three voxels touching only at corners: one 26-connected component of size 3
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = True
    # a 2-voxel component far away
    mask[9, 9, 8:10] = True
    out = remove_small_components(mask, 3)
    assert out[1, 1, 1] and out[2, 2, 2] and out[3, 3, 3]
    assert not out[9, 9].any()
    assert out.sum() == 3
    assert remove_small_components(mask, 4).sum() == 0
    assert remove_small_components(mask, 0).sum() == 5


# ---------------------------------------------------------------------------------- holes


def test_fill_pinhole_in_thin_sheet_and_full_hole():
    mask = _empty(dtype=bool)
    mask[5, 2:10, 2:10] = True      # 1-voxel-thick sheet in the y-x plane
    mask[5, 6, 6] = False           # pinhole through it
    out = fill_pinholes(mask)
    assert out[5, 6, 6]
    assert out.sum() == 64          # nothing else added
    cube = _empty(dtype=bool)
    cube[2:7, 2:7, 2:7] = True
    cube[4, 4, 4] = False           # voxel with all 6 neighbours foreground
    assert fill_pinholes(cube)[4, 4, 4]


def test_fill_pinholes_leaves_gap_between_parallel_sheets():
    mask = _empty(dtype=bool)
    mask[4, 2:10, 2:10] = True
    mask[6, 2:10, 2:10] = True      # z-gap of 1 voxel between two sheets: not a hole
    out = fill_pinholes(mask)
    np.testing.assert_array_equal(out, mask)


def test_fill_pinholes_does_not_fill_2_voxel_hole():
    mask = _empty(dtype=bool)
    mask[5, 2:10, 2:10] = True
    mask[5, 6, 6:8] = False
    out = fill_pinholes(mask)
    assert not out[5, 6, 6] and not out[5, 6, 7]


def test_cavity_size_limit():
    mask = _empty((14, 14, 14), dtype=bool)
    mask[1:6, 1:6, 1:6] = True
    mask[2:5, 2:5, 2:5] = False     # 27-voxel enclosed cavity
    mask[7:12, 7:12, 7:12] = True
    mask[8:11, 8:11, 9] = False     # 9-voxel enclosed cavity
    out = fill_cavities(mask, 9)
    assert out[8:11, 8:11, 9].all()
    assert not out[2:5, 2:5, 2:5].any()
    out = fill_cavities(mask, 27)
    assert out[2:5, 2:5, 2:5].all()
    assert fill_cavities(mask, 0).sum() == mask.sum()


def test_cavity_touching_border_is_not_filled():
    mask = _empty((8, 8, 8), dtype=bool)
    mask[0:4, 2:7, 2:7] = True
    mask[0:3, 3:6, 3:6] = False     # open on the z=0 face
    out = fill_cavities(mask, 1000)
    np.testing.assert_array_equal(out, mask)


def test_cavity_closed_by_diagonal_shell_only_is_not_a_6_cavity():
    # background 6-connectivity: a voxel whose face neighbours are all foreground is enclosed
    mask = _empty((5, 5, 5), dtype=bool)
    mask[1:4, 1:4, 1:4] = True
    mask[2, 2, 2] = False
    assert fill_cavities(mask, 1)[2, 2, 2]


# ---------------------------------------------------------------------------------- closing


def test_closing_bridges_one_voxel_gap():
    mask = _empty((12, 12, 16), dtype=bool)
    mask[4:8, 4:8, 2:7] = True
    mask[4:8, 4:8, 8:13] = True     # 1-voxel gap at x = 7
    out = binary_closing(mask, 1)
    assert out[5:7, 5:7, 7].all()
    assert (out >= mask).all()
    # nothing appears far from the object
    assert not out[0].any() and not out[:, :, 0].any()


def test_closing_does_not_grow_into_zeroed_border():
    mask = _empty((10, 10, 10), dtype=bool)
    mask[2:8, 2:8, 2:8] = True
    mask = zero_border(mask, 2)
    out = postprocess(mask.astype(np.float32), PostprocessConfig(closing_radius=2, border=2))
    assert out[:2].sum() == 0 and out[:, :, -2:].sum() == 0


# ---------------------------------------------------------------------------------- border


def test_border_zeroing():
    prob = np.ones((8, 9, 10), np.float32)
    out = postprocess(prob, PostprocessConfig(border=2))
    assert out.sum() == 4 * 5 * 6
    assert out[2:-2, 2:-2, 2:-2].all()


# ---------------------------------------------------------------------------------- YAML


def test_yaml_round_trip(tmp_path):
    cfg = PostprocessConfig(threshold=0.3, hysteresis_low=0.2, hysteresis_high=0.7,
                            min_component_size=1000, fill_pinholes=True, max_cavity_size=50,
                            closing_radius=1, border=3)
    path = tmp_path / "pp.yaml"
    save_postprocess(cfg, path)
    assert load_postprocess(path) == cfg


def test_load_postprocess_accepts_section_and_names_bad_key(tmp_path):
    path = tmp_path / "full.yaml"
    path.write_text("postprocess:\n  threshold: 0.25\n  min_component_size: 10\n")
    assert load_postprocess(path) == PostprocessConfig(threshold=0.25, min_component_size=10)
    bad = tmp_path / "bad.yaml"
    bad.write_text("threshhold: 0.3\n")
    with pytest.raises(ConfigError, match="threshhold"):
        load_postprocess(bad)
    bad.write_text("hysteresis_low: 0.3\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_postprocess(bad)


# ---------------------------------------------------------------------------------- winners' steps

from kaggle_utils.metrics import score_volume  # noqa: E402
from kaggle_utils.postprocess import (  # noqa: E402
    binary_opening,
    directional_closing,
    patch_sheet_holes,
    plug_holes,
    plug_lut,
    prune_z_specks,
    ridge_filter,
    sheet_postprocess,
    skeleton_rethicken,
    split_merged_sheets,
    tunnel_count,
)


def _n_components(mask, connectivity=26):
    import cc3d

    return int(cc3d.connected_components(np.asarray(mask, bool), connectivity=connectivity, return_N=True)[1])


def _plane(shape=(20, 40, 40), z=8, thick=2, lo=3, hi=37):
    mask = np.zeros(shape, dtype=bool)
    mask[z:z + thick, lo:hi, lo:hi] = True
    return mask


def _tilted(shape=(30, 40, 40), slope=0.4, thick=2):
    mask = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    zc = (5 + slope * yy).astype(int)
    for d in range(thick):
        mask[zc + d, yy, xx] = True
    return mask


def test_new_options_are_off_by_default_and_validated():
    cfg = PostprocessConfig()
    assert not (cfg.sheets or cfg.hole_plug or cfg.z_prune)
    assert cfg.closing_z == cfg.closing_xy == cfg.opening_radius == 0
    assert cfg.ridge_sigma == 0 and cfg.skeleton_radius == 0 and cfg.split_levels == ()
    with pytest.raises(ValueError, match="closing_z"):
        PostprocessConfig(closing_z=-1)
    with pytest.raises(ValueError, match="split_levels"):
        PostprocessConfig(split_levels=(0.7, 0.5))
    with pytest.raises(ValueError, match="skeleton_threshold"):
        PostprocessConfig(skeleton_threshold=1.5)


def test_tunnel_count_known_shapes():
    assert tunnel_count(_plane()) == 0
    holed = _plane()
    holed[:, 15:20, 15:20] = False
    assert tunnel_count(holed) == 1
    ring = np.zeros((5, 9, 9), bool)
    ring[2, 2:7, 2:7] = True
    ring[2, 3:6, 3:6] = False
    assert tunnel_count(ring) == 1
    assert tunnel_count(np.zeros((4, 4, 4), bool)) == 0


def test_sheet_hole_is_patched_exactly():
    full = _plane()
    holed = full.copy()
    holed[:, 15:22, 15:20] = False          # 35-pixel hole through a 2-voxel sheet
    out = patch_sheet_holes(holed, max_hole=100)
    np.testing.assert_array_equal(out, full)
    assert patch_sheet_holes(holed, max_hole=34).sum() == holed.sum()  # hole too large: untouched
    res = sheet_postprocess(holed, closing=0, max_hole=100)
    np.testing.assert_array_equal(res, full)
    assert tunnel_count(res) == 0


def test_tilted_sheet_hole_follows_the_slope():
    full = _tilted()
    holed = full.copy()
    holed[:, 15:22, 15:21] = False
    out = patch_sheet_holes(holed, max_hole=100)
    assert (out >= holed).all()
    assert tunnel_count(out) == 0 and tunnel_count(holed) == 1
    # every patched voxel is within one voxel (along z) of the true sheet
    near = full | np.roll(full, 1, axis=0) | np.roll(full, -1, axis=0)
    assert (out & ~near).sum() == 0
    assert (out[:, 15:22, 15:21].any(axis=0)).all()


def test_hole_open_to_the_outside_is_not_patched():
    notch = _plane()
    notch[:, 3:10, 15:20] = False           # a notch cut from the sheet's edge
    np.testing.assert_array_equal(patch_sheet_holes(notch, 1000), notch)


def test_parallel_sheets_two_voxels_apart_are_not_merged():
    two = np.zeros((24, 30, 30), bool)
    two[10, 3:27, 3:27] = True
    two[13, 3:27, 3:27] = True              # gap of 2 voxels (z = 11, 12)
    two[10, 10:13, 10:13] = False           # a hole in the lower sheet
    assert _n_components(binary_closing(two, 3)) == 1  # a global closing merges them
    out = sheet_postprocess(two, closing=3, max_hole=100)
    assert _n_components(out) == 2
    assert out[10, 10:13, 10:13].all()       # the hole is still patched
    assert (out >= two).all()
    # separation is one voxel: no voxel of one sheet is a 26-neighbour of the other
    out2 = sheet_postprocess(two, closing=3, max_hole=100, plug=True)
    assert _n_components(out2) == 2


def test_sheet_safety_check_keeps_unpatched_when_tunnels_rise():
    # a U-shaped sheet seen from above: its projection has an enclosed hole, but the sheet has
    # none; "patching" it would add a bridge at the interpolated height and create a tunnel
    u = np.zeros((30, 30, 30), bool)
    u[3:27, 5:25, 5] = True
    u[3:27, 5:25, 24] = True
    u[3, 5:25, 5:25] = True
    u[3:27, 5, 5:25] = True
    u[3:27, 24, 5:25] = True                 # a box open at z = 26 (projection along z: a ring)
    before = tunnel_count(u)
    out = sheet_postprocess(u, closing=0, max_hole=10_000)
    assert tunnel_count(out) <= before


def test_plug_lut_known_entries_and_plugging():
    lut = plug_lut()
    assert lut.shape == (256,) and lut[0] == 0 and lut[255] == 0
    assert lut[0b00000110] == 0b00000001     # face-diagonal pair: one voxel connects them
    assert lut[0b01111110] == 0b00000001     # six voxels around an empty diagonal: a loop, plugged
    assert bin(int(lut[0b10000001])).count("1") == 2  # corner-diagonal pair: two voxels
    assert lut[0b00000011] == 0 and lut[0b00001111] == 0
    m = np.zeros((6, 6, 6), bool)
    m[2, 2, 2] = m[3, 3, 3] = True            # touching at a corner only: two 6-components
    out = plug_holes(m)
    assert _n_components(out, 6) == 1 and out.sum() == 4
    flat = _plane((8, 12, 12), z=3, thick=1, lo=2, hi=10)
    np.testing.assert_array_equal(plug_holes(flat), flat)   # a clean sheet is unchanged


def test_z_prune_removes_one_slice_speck_keeps_sheets():
    m = _plane((20, 20, 20), z=5, thick=2, lo=2, hi=18)
    m[12, 8, 8] = True                        # isolated one-slice speck
    m[15, 3:8, 3:8] = True                    # one-slice flat patch: pruned too (by design)
    out = prune_z_specks(m)
    assert not out[12].any() and not out[15].any()
    np.testing.assert_array_equal(out[:10], m[:10])
    col = np.zeros((10, 5, 5), bool)
    col[2:4, 2, 2] = True                     # two-slice speck survives
    np.testing.assert_array_equal(prune_z_specks(col), col)


def test_directional_closings_and_opening():
    m = np.zeros((12, 12, 12), bool)
    m[2:5, 4:8, 4:8] = True
    m[6:9, 4:8, 4:8] = True                   # gap at z = 5
    zc = directional_closing(m, 1, "z")
    assert zc[5, 4:8, 4:8].all() and (zc >= m).all() and zc.sum() == m.sum() + 16
    np.testing.assert_array_equal(directional_closing(m, 2, "xy"), m)  # no in-plane gap
    g = np.zeros((6, 12, 12), bool)
    g[3, 2:5, 2:10] = True
    g[3, 6:9, 2:10] = True                    # in-plane gap at y = 5
    xy = directional_closing(g, 1, "xy")
    assert xy[3, 5, 3:9].all() and not xy[2].any() and not xy[4].any()
    np.testing.assert_array_equal(directional_closing(g, 2, "z"), g)
    with pytest.raises(ValueError, match="plane"):
        directional_closing(g, 1, "q")
    blob = np.zeros((12, 12, 12), bool)
    blob[2:9, 2:9, 2:9] = True
    blob[10, 10, 10] = True                   # a speck
    op = binary_opening(blob, 1)
    assert not op[10, 10, 10] and op[3:8, 3:8, 3:8].all() and (op <= blob).all()


def test_ridge_filter_keeps_sheet_drops_blob():
    from scipy import ndimage

    truth = np.zeros((32, 32, 48), bool)
    truth[15:17, 4:28, 4:24] = True           # a 2-voxel sheet
    blob = np.zeros_like(truth)
    blob[12:17, 12:17, 32:37] = True          # a 5^3 blob (debris)
    prob = ndimage.gaussian_filter((truth | blob).astype(np.float32), 1.0)
    mask = prob > 0.3
    out = ridge_filter(mask, prob, sigma=1.0, ratio=2.0)
    assert out[15:17, 8:24, 8:20].all()      # the sheet's inside survives
    assert mask[..., 30:].sum() > 100 and out[..., 30:].sum() == 0  # the blob is gone
    assert out[..., :28].sum() >= 0.95 * mask[..., :28].sum()
    assert (out <= mask).all()


def test_skeleton_rethicken_only_adds_and_bridges_gaps():
    thick = np.zeros((9, 30, 30), bool)
    thick[4, 5:25, 10] = True                 # a 1-voxel line in one slice
    out = skeleton_rethicken(thick, 1.5)
    assert (out >= thick).all() and out[3:6, 5:25, 9:12].sum() > thick.sum()
    broken = thick.copy()
    broken[4, 14:16, 10] = False              # gap in the line ...
    low = thick.copy()                        # ... present at a lower threshold
    bridged = skeleton_rethicken(broken, 1.5, source=low)
    assert _n_components(broken) == 2 and _n_components(bridged) == 1


def test_split_merged_sheets_cuts_the_bridge():
    from scipy import ndimage

    two = np.zeros((24, 24, 24), bool)
    two[8:10, 2:22, 2:22] = True
    two[14:16, 2:22, 2:22] = True
    prob = ndimage.gaussian_filter(two.astype(np.float32), 1.0) * 0.9
    prob[10:14, 10:13, 10:13] = 0.45          # a weak bridge merges the two sheets at 0.4
    mask = prob > 0.4
    assert _n_components(mask) == 1
    out = split_merged_sheets(prob, mask, levels=(0.5, 0.6), min_size=100)
    assert _n_components(out) == 2
    assert (out <= mask).all() and out[8:10, 4:20, 4:20].all() and out[14:16, 4:20, 4:20].all()
    np.testing.assert_array_equal(split_merged_sheets(prob, mask, levels=()), mask)


def test_each_new_step_runs_in_the_pipeline():
    rng = np.random.default_rng(1)
    from scipy import ndimage

    prob = ndimage.gaussian_filter(rng.random((24, 24, 24)).astype(np.float32), 2.0)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    for kw in (dict(sheets=True), dict(hole_plug=True), dict(z_prune=True), dict(closing_z=1), dict(closing_xy=1),
               dict(opening_radius=1), dict(ridge_sigma=1.0), dict(skeleton_radius=1.5),
               dict(skeleton_radius=1.5, skeleton_threshold=0.4), dict(split_levels=(0.6, 0.7), split_min_size=10),
               dict(sheets=True, hole_plug=True, border=3)):
        out = postprocess(prob, PostprocessConfig(threshold=0.5, **kw))
        assert out.dtype == np.uint8 and out.shape == prob.shape, kw
        if kw.get("border"):
            assert out[:3].sum() == 0 and out[:, :, -3:].sum() == 0


def test_ignore_region_never_matters_for_the_score():
    # ground truth: a sheet whose hole region is labelled 2 (ignore), and a label-2 slab with a speck
    gt = np.zeros((20, 40, 40), np.uint8)
    gt[8:10, 3:37, 3:37] = 1
    gt[:, 15:22, 15:20] = 2
    gt[14:18] = 2
    prob = np.where(gt == 1, 0.9, 0.05).astype(np.float32)
    prob[:, 15:22, 15:20] = 0.05             # the prediction has a hole exactly there
    prob[16, 30, 30] = 0.9                   # a one-slice speck inside the ignore slab
    plain = score_volume(postprocess(prob, PostprocessConfig()), gt)
    patched = postprocess(prob, PostprocessConfig(sheets=True, sheet_closing=0, sheet_max_hole=100))
    pruned = postprocess(prob, PostprocessConfig(z_prune=True))
    assert patched[8:10, 15:22, 15:20].all() and not pruned[16, 30, 30]  # the steps did act ...
    for out in (patched, pruned):
        assert score_volume(out, gt).score == pytest.approx(plain.score, abs=1e-12)  # ... unseen


def test_yaml_round_trip_new_fields(tmp_path):
    cfg = PostprocessConfig(sheets=True, sheet_closing=2, sheet_max_hole=500, hole_plug=True, z_prune=True,
                            closing_z=2, closing_xy=1, opening_radius=1, ridge_sigma=1.5, skeleton_radius=1.5,
                            skeleton_threshold=0.3, split_levels=(0.5, 0.6))
    path = tmp_path / "pp.yaml"
    save_postprocess(cfg, path)
    assert load_postprocess(path) == cfg


def test_closing_matches_scipy_ball_closing():
    from scipy import ndimage

    from kaggle_utils.postprocess import _ball

    rng = np.random.default_rng(0)
    for r in (1, 2, 3):
        m = ndimage.gaussian_filter(rng.random((24, 26, 28)), 1.5) > 0.52
        ref = ndimage.binary_closing(np.pad(m, r), structure=_ball(r))[r:-r, r:-r, r:-r] | m
        np.testing.assert_array_equal(binary_closing(m, r), ref)


# ---- speed rewrites give the previous implementation's answers -------------------------------------


def _ridge_reference(mask: np.ndarray, prob: np.ndarray, sigma: float, ratio: float) -> np.ndarray:
    """ridge_filter before the speed-up: six full gaussian_filter calls and LAPACK eigvalsh."""
    from scipy import ndimage

    out = np.zeros_like(mask)
    if not mask.any():
        return out
    where = np.nonzero(mask)
    h = np.empty((len(where[0]), 3, 3), dtype=np.float32)
    p = prob.astype(np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            h[:, i, j] = h[:, j, i] = ndimage.gaussian_filter(p, sigma, order=order, mode="nearest")[where]
    ev = np.linalg.eigvalsh(h)
    keep = (ev[:, 0] < 0) & (-ev[:, 0] >= ratio * np.maximum(np.abs(ev[:, 1]), np.abs(ev[:, 2])))
    out[tuple(w[keep] for w in where)] = True
    return out


def _patch_reference(sheet: np.ndarray, max_hole: int) -> np.ndarray:
    """patch_sheet_holes before the speed-up: lo/hi by float min/max, one griddata call each."""
    from scipy import ndimage
    from scipy.interpolate import griddata

    out = sheet.copy()
    if max_hole <= 0 or not sheet.any():
        return out
    axis = int(np.argmax([int(sheet.any(axis=a).sum()) for a in range(3)]))
    s = np.moveaxis(sheet, axis, 0)
    proj = s.any(axis=0)
    holes, n = ndimage.label(~proj)
    if n == 0:
        return out
    edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    ok = np.bincount(holes.ravel(), minlength=n + 1) <= max_hole
    ok[0] = False
    ok[edge] = False
    if not ok.any():
        return out
    depth = s.shape[0]
    idx = np.arange(depth, dtype=np.float32)[:, None, None]
    lo = np.where(s, idx, np.inf).min(axis=0)
    hi = np.where(s, idx, -np.inf).max(axis=0)
    fill = np.zeros(proj.shape, dtype=bool)
    for k, sl in enumerate(ndimage.find_objects(holes), start=1):
        if sl is None or not ok[k]:
            continue
        sl = tuple(slice(max(a.start - 1, 0), a.stop + 1) for a in sl)
        hole = holes[sl] == k
        ring = ndimage.binary_dilation(hole, structure=np.ones((3, 3), bool)) & proj[sl]
        pts, tgt = np.argwhere(ring), np.argwhere(hole)
        for arr in (lo, hi):
            vals = arr[sl][ring]
            try:
                est = griddata(pts, vals, tgt, method="linear")
            except Exception:
                est = np.full(len(tgt), np.nan)
            bad = np.isnan(est)
            if bad.any():
                est[bad] = griddata(pts, vals, tgt[bad], method="nearest")
            arr[sl][hole] = est
        fill[sl] |= hole
    lo_r, hi_r = np.floor(lo + 0.5), np.floor(hi + 0.5)
    cross = ndimage.generate_binary_structure(2, 1)
    hi_nb = ndimage.minimum_filter(np.where(np.isfinite(hi_r), hi_r, np.inf), footprint=cross, mode="nearest")
    lo_nb = ndimage.maximum_filter(np.where(np.isfinite(lo_r), lo_r, -np.inf), footprint=cross, mode="nearest")
    lo_f, hi_f = np.minimum(lo_r, hi_nb), np.maximum(hi_r, lo_nb)
    cols = fill & np.isfinite(lo_f) & np.isfinite(hi_f)
    lo_f = np.where(cols, np.clip(lo_f, 0, depth - 1), depth)
    hi_f = np.where(cols, np.clip(hi_f, 0, depth - 1), -1)
    o = np.moveaxis(out, axis, 0)
    o |= (idx >= lo_f[None]) & (idx <= hi_f[None])
    return out


def _noisy_case(seed: int, shape=(40, 44, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic label's blurred, speckled probability map (the kind post-processing sees)."""
    from scipy import ndimage

    from kaggle_utils.synthetic import make_volume

    _, label = make_volume(shape, seed=seed)
    rng = np.random.default_rng(seed)
    sheet = (label == 1).astype(np.float32)
    sheet[rng.random(shape) < 0.01] = 0.0                      # punched holes
    prob = ndimage.gaussian_filter(sheet, 1.0) + 0.3 * ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 1.5)
    return (prob / prob.max()).astype(np.float32), label


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sigma,ratio", [(1.0, 2.0), (1.5, 1.0)])
def test_ridge_filter_equals_previous_implementation(seed, sigma, ratio):
    prob, _ = _noisy_case(seed)
    mask = prob > 0.3
    np.testing.assert_array_equal(ridge_filter(mask, prob, sigma, ratio), _ridge_reference(mask, prob, sigma, ratio))


def test_closed_form_eigenvalues_match_lapack():
    from kaggle_utils.postprocess import _sym3_eigvals

    rng = np.random.default_rng(0)
    h = rng.standard_normal((5000, 6)).astype(np.float32)
    h[:100] = [1, 0, 0, 1, 0, 1]                              # degenerate: identity
    h[100:200] = [2, 0, 0, 2, 0, -1]                          # two equal eigenvalues
    m = np.empty((len(h), 3, 3))
    for (i, j), k in {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 1): 3, (1, 2): 4, (2, 2): 5}.items():
        m[:, i, j] = m[:, j, i] = h[:, k]
    np.testing.assert_allclose(_sym3_eigvals(h), np.linalg.eigvalsh(m), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sheet_patching_equals_previous_implementation(seed, monkeypatch):
    import cc3d

    import kaggle_utils.postprocess as pp

    prob, _ = _noisy_case(seed)
    mask = remove_small_components(prob > 0.4, 50)
    labels = cc3d.connected_components(mask, connectivity=26)
    for lab in range(1, min(int(labels.max()), 4) + 1):
        sheet = labels == lab
        for max_hole in (16, 4096):
            np.testing.assert_array_equal(patch_sheet_holes(sheet, max_hole), _patch_reference(sheet, max_hole))
    new = {plug: sheet_postprocess(mask, closing=1, max_hole=256, max_sheets=8, plug=plug) for plug in (False, True)}

    def old_fix(sheet, closing, max_hole, plug):  # _sheet_fix before it skipped work when nothing was patched
        closed = pp.binary_closing(sheet, closing) if closing > 0 else sheet
        patched = _patch_reference(closed, max_hole)
        if plug:
            closed, patched = pp.plug_holes(closed), pp.plug_holes(patched)
        if max_hole > 0 and (patched != closed).any() and pp.tunnel_count(patched) > pp.tunnel_count(closed):
            return closed
        return patched

    monkeypatch.setattr(pp, "_sheet_fix", old_fix)
    for plug in (False, True):
        np.testing.assert_array_equal(new[plug], sheet_postprocess(mask, closing=1, max_hole=256, max_sheets=8,
                                                                   plug=plug))


def test_euler_number_equals_scikit_image():
    from skimage.measure import euler_number

    from kaggle_utils.postprocess import _euler_number_6

    rng = np.random.default_rng(0)
    for k in range(12):
        shape = tuple(int(x) for x in rng.integers(1, 12, size=3))
        m = rng.random(shape) < (0.2 + 0.05 * k)
        assert _euler_number_6(m) == int(euler_number(m, connectivity=1)), (k, shape)
    ring = np.zeros((5, 9, 9), bool)
    ring[2, 2:7, 2:7] = True
    ring[2, 3:6, 3:6] = False
    assert _euler_number_6(ring) == 0                      # a loop: 1 component - 1 tunnel
    assert _euler_number_6(np.ones((3, 3, 3), bool)) == 1


@pytest.mark.parametrize("seed", range(6))
def test_plug_near_changes_equals_full_plug(seed):
    from kaggle_utils.postprocess import _plug_near

    rng = np.random.default_rng(seed)
    before = rng.random((14, 15, 16)) < 0.35
    after = before.copy()
    region = tuple(slice(int(a), int(a) + 4) for a in rng.integers(0, 12, size=3))
    if seed % 2:  # changes touching the volume's faces too
        region = tuple(slice(0, 3) for _ in range(3))
    after[region] |= rng.random(after[region].shape) < 0.5
    np.testing.assert_array_equal(_plug_near(after, plug_holes(before), after != before), plug_holes(after))
