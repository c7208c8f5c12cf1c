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
    cfg = PostprocessConfig(threshold=0.3, min_component_size=3, fill_holes=True,
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
                            min_component_size=1000, fill_holes=True, max_cavity_size=50,
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
