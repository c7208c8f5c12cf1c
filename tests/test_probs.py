"""Probability files (``kaggle_utils.probs``): the compact uint8 format and the old float16 one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from kaggle_utils.data import DataError, write_volume
from kaggle_utils.probs import (
    PROB_SCALE,
    as_probability,
    find_prob_files,
    quantize_probs,
    read_probs,
    write_probs,
)


def _probs(shape=(12, 16, 20), seed=0) -> np.ndarray:
    """Smooth float32 probabilities spanning [0, 1], with the exact ends and a mid value."""
    rng = np.random.default_rng(seed)
    p = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 1.5)
    p = (p - p.min()) / (p.max() - p.min())
    p.flat[:3] = [0.0, 1.0, 0.5]
    return p


def test_uint8_round_trip_and_sidecar(tmp_path):
    prob = _probs()
    path = write_probs(tmp_path / "oof", "17", "34117", prob, 2, epoch=5)
    assert path.name == "17.npz"
    stored = read_probs(path)
    assert stored.dtype == np.uint8 and stored.shape == prob.shape
    np.testing.assert_array_equal(stored, quantize_probs(prob))
    back = as_probability(stored)
    assert back.dtype == np.float32
    assert back.flat[0] == 0.0 and back.flat[1] == 1.0
    meta = json.loads((tmp_path / "oof" / "17.json").read_text())
    assert meta == {"id": "17", "scroll_id": "34117", "fold": 2, "shape": [12, 16, 20], "dtype": "uint8",
                    "format": "p*255 rounded", "scale": 255, "epoch": 5}
    # np.load reads the file unaided: a plain .npz
    with np.load(path) as z:
        np.testing.assert_array_equal(z["prob"], stored)


def test_quantisation_error_is_at_most_half_a_step():
    p = np.concatenate([np.linspace(0, 1, 100_001, dtype=np.float32), _probs().ravel()])
    err = np.abs(as_probability(quantize_probs(p)) - p)
    assert float(err.max()) <= 0.5 / PROB_SCALE + 1e-7
    # thresholding moves only voxels within half a step of the threshold
    for t in (0.2, 0.25, 0.37, 0.5):
        moved = (as_probability(quantize_probs(p)) > t) != (p > t)
        assert np.all(np.abs(p[moved] - t) <= 0.5 / PROB_SCALE + 1e-7)


def test_quantize_clips_and_zeroes_nan():
    codes = quantize_probs(np.array([-0.3, np.nan, 1.7, 0.5 / 255 + 1e-4], dtype=np.float32))
    np.testing.assert_array_equal(codes, [0, 0, 255, 1])


def test_float16_still_written_and_read(tmp_path):
    prob = _probs()
    path = write_probs(tmp_path, "a", "1", prob, fmt="float16")
    assert path.name == "a.npy"
    stored = read_probs(path)
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(as_probability(stored), prob.astype(np.float16).astype(np.float32))
    assert read_probs(path, mmap=True).dtype == np.float16
    # an old file written before this module, by np.save, reads the same
    np.save(tmp_path / "b.npy", prob.astype(np.float16))
    np.testing.assert_array_equal(read_probs(tmp_path / "b.npy"), stored)


def test_rewriting_in_the_other_format_leaves_one_file(tmp_path):
    write_probs(tmp_path, "a", "1", _probs(), fmt="float16")
    write_probs(tmp_path, "a", "1", _probs())
    assert [p.name for p in find_prob_files(tmp_path)] == ["a.npz"]


def test_unknown_format_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="unknown probability format 'int4'"):
        write_probs(tmp_path, "a", "1", _probs(), fmt="int4")
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="t.npz: unreadable probability file"):
        read_probs(tmp_path / "t.npz")
    np.savez(tmp_path / "o.npz", other=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="o.npz: no 'prob' array"):
        read_probs(tmp_path / "o.npz")
    np.save(tmp_path / "i.npy", np.zeros((2, 2, 2), np.int32))
    with pytest.raises(DataError, match="i.npy: probabilities of dtype int32"):
        read_probs(tmp_path / "i.npy")


def test_tune_and_diagnose_read_both_formats(tmp_path):
    """One folder per format with the same probabilities: tune and diagnose see the same volumes."""
    from kaggle_utils.diagnostics import load_predictions
    from kaggle_utils.synthetic import make_volume
    from kaggle_utils.tune import SearchSpace, load_labels, load_probs, tune

    root = tmp_path / "data"
    rows, probs = [], {}
    for k in range(2):
        image, label = make_volume((32, 32, 32), seed=7 + k)
        vid = f"v{k}"
        write_volume(root / "train_images" / f"{vid}.tif", image)
        write_volume(root / "train_labels" / f"{vid}.tif", label)
        rows.append(f"{vid},{k}\n")
        fg = ndimage.gaussian_filter((label == 1).astype(np.float32), 1.0)
        probs[vid] = np.clip(fg * 2.5, 0, 1)
    (root / "train.csv").write_text("id,scroll_id\n" + "".join(rows))
    for fmt in ("uint8", "float16"):
        for k, (vid, p) in enumerate(probs.items()):
            write_probs(tmp_path / fmt / f"fold{k}" / "oof", vid, str(k), p, k, fmt=fmt)
    space = SearchSpace(threshold=[0.3, 0.5], min_component_size=[0], closing_radius=[0], fill_pinholes=[False],
                        max_cavity_size=[0], border=[0])
    results = {}
    for fmt in ("uint8", "float16"):
        loaded = load_probs(tmp_path / fmt)
        assert [p.id for p in loaded] == ["v0", "v1"] and [p.fold for p in loaded] == [0, 1]
        assert loaded[0].prob.dtype == (np.uint8 if fmt == "uint8" else np.float16)
        np.testing.assert_allclose(loaded[0].probability(), probs["v0"], atol=0.5 / PROB_SCALE + 1e-3)
        results[fmt] = tune(loaded, load_labels(root, ["v0", "v1"]), space, workers=1, progress=False, curve=False)
        diag = dict(load_predictions(tmp_path / fmt / "fold0" / "oof"))
        assert list(diag) == ["v0"] and diag["v0"].dtype == np.float32
    assert results["uint8"].best.threshold == results["float16"].best.threshold
    assert results["uint8"].best_score == pytest.approx(results["float16"].best_score, abs=1e-3)
