"""Tests for kaggle_utils.submission: writer, validator (one test per broken-zip kind), predict_dataset."""

from __future__ import annotations

import io
import json
import sys
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from kaggle_utils.data import normalize_intensity, write_volume
from kaggle_utils.postprocess import PostprocessConfig, postprocess
from kaggle_utils.predict import PredictReport, plan_tta, predict_dataset, staging_dir
from kaggle_utils.probs import as_probability, read_probs
from kaggle_utils.submission import (
    SubmissionError,
    read_tiff_shape,
    validate_submission,
    write_submission,
)

SHAPES = {"a1": (12, 14, 16), "b2": (10, 10, 10), "c3": (16, 12, 9)}


def _make_test_set(root: Path, shapes=SHAPES, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "test_images").mkdir(parents=True)
    lines = ["id,scroll_id"]
    for i, (vid, shape) in enumerate(shapes.items()):
        lines.append(f"{vid},{100 + i}")
        write_volume(root / "test_images" / f"{vid}.tif", rng.integers(0, 200, shape, dtype=np.uint8))
    (root / "test.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return _make_test_set(tmp_path / "data")


def _masks(shapes=SHAPES, seed=1):
    rng = np.random.default_rng(seed)
    return {vid: (rng.random(shape) > 0.7).astype(np.uint8) for vid, shape in shapes.items()}


def _tif(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="lzw", photometric="minisblack")
    return buf.getvalue()


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def _valid_entries():
    return [(f"{vid}.tif", _tif(m)) for vid, m in _masks().items()]


# ---------------------------------------------------------------------------------- writer


def test_write_validate_round_trip(tmp_path, data_dir):
    masks = _masks()
    out = write_submission(masks.items(), tmp_path / "sub" / "submission.zip")
    assert validate_submission(out, data_dir) == []
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(f"{v}.tif" for v in masks)
        for vid, m in masks.items():
            with tifffile.TiffFile(io.BytesIO(zf.read(f"{vid}.tif"))) as tif:
                assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE  # no imagecodecs needed
                got = tif.asarray()
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, m)
    assert [p.name for p in out.parent.iterdir()] == ["submission.zip"]


def test_writer_binarizes_bool_and_ints_refuses_floats(tmp_path):
    out = write_submission([("x", np.full((2, 3, 4), True)), ("y", np.full((2, 3, 4), 7, np.int32))],
                           tmp_path / "s.zip")
    with zipfile.ZipFile(out) as zf:
        for name in ("x.tif", "y.tif"):
            arr = tifffile.imread(io.BytesIO(zf.read(name)))
            assert arr.dtype == np.uint8 and (arr == 1).all()
    with pytest.raises(SubmissionError, match="threshold"):
        write_submission([("x", np.full((2, 3, 4), 0.3, np.float32))], tmp_path / "f.zip")
    assert not (tmp_path / "f.zip").exists()


@pytest.mark.parametrize("bad_id", ["../x", "a/b", "", ".."])
def test_writer_refuses_bad_ids(tmp_path, bad_id):
    with pytest.raises(SubmissionError, match="invalid volume id"):
        write_submission([(bad_id, np.zeros((2, 2, 2), np.uint8))], tmp_path / "s.zip")


def test_writer_refuses_duplicate_id(tmp_path):
    m = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(SubmissionError, match="twice"):
        write_submission([("x", m), ("x", m)], tmp_path / "s.zip")


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "submission.zip"

    def items():
        yield "a1", np.zeros((4, 4, 4), np.uint8)
        raise RuntimeError("model crashed mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        write_submission(items(), target)
    assert list(tmp_path.iterdir()) == []  # no zip, no temp file
    # an existing submission survives a failed rewrite unchanged
    write_submission([("old", np.ones((2, 2, 2), np.uint8))], target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        write_submission(items(), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["submission.zip"]


def _pil_pages(data: bytes) -> np.ndarray:
    """Read a TIFF as the competition's scorer does: PIL, page by page."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    pages = []
    for i in range(img.n_frames):
        img.seek(i)
        pages.append(np.array(img))
    return np.stack(pages)


@pytest.mark.parametrize("codecs", ["imagecodecs", "without imagecodecs"])
def test_submission_tiffs_read_back_identically_with_pil(tmp_path, request, codecs):
    if codecs == "without imagecodecs":
        request.getfixturevalue("no_imagecodecs")
    rng = np.random.default_rng(7)
    masks = {"odd": (rng.random((7, 13, 22)) > 0.5).astype(np.uint8),
             "one": (rng.random((1, 5, 3)) > 0.5).astype(np.uint8)}
    out = write_submission(masks.items(), tmp_path / "submission.zip")
    with zipfile.ZipFile(out) as zf:
        for vid, m in masks.items():
            assert zf.getinfo(f"{vid}.tif").compress_type == zipfile.ZIP_DEFLATED
            got = _pil_pages(zf.read(f"{vid}.tif"))
            assert got.dtype == np.uint8 and got.shape == m.shape
            np.testing.assert_array_equal(got, m)


def test_no_imagecodecs_for_real_in_a_fresh_interpreter(tmp_path):
    """tifffile imported with `import imagecodecs` failing, as on Kaggle: submission TIFFs are written
    and PIL reads them back; an LZW image gives the one-line codec message."""
    import subprocess

    lzw = tmp_path / "lzw.tif"
    write_volume(lzw, np.ones((3, 4, 5), np.uint8))
    code = f"""
import io, sys, zipfile
sys.modules["imagecodecs"] = None
import numpy as np
from PIL import Image
from kaggle_utils.data import DataError, read_volume
from kaggle_utils.submission import write_submission
m = (np.random.default_rng(0).random((5, 9, 11)) > 0.5).astype(np.uint8)
write_submission([("v", m)], {str(tmp_path / "s.zip")!r})
img = Image.open(io.BytesIO(zipfile.ZipFile({str(tmp_path / "s.zip")!r}).read("v.tif")))
pages = []
for i in range(img.n_frames):
    img.seek(i)
    pages.append(np.array(img))
assert np.array_equal(np.stack(pages), m)
try:
    read_volume({str(lzw)!r})
except DataError as exc:
    print(exc)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{lzw}: LZW-compressed TIFF; tifffile cannot decode LZW without the 'imagecodecs'")


# ---------------------------------------------------------------------------------- validator


def _problems(tmp_path, data_dir, entries):
    return validate_submission(_zip(tmp_path / "s.zip", entries), data_dir)


def test_validator_missing_id(tmp_path, data_dir):
    probs = _problems(tmp_path, data_dir, _valid_entries()[:2])
    assert len(probs) == 1 and "missing" in probs[0] and "c3" in probs[0]


def test_validator_extra_id(tmp_path, data_dir):
    probs = _problems(tmp_path, data_dir, _valid_entries() + [("zz.tif", _tif(np.zeros((2, 2, 2), np.uint8)))])
    assert len(probs) == 1 and "extra" in probs[0] and "zz" in probs[0]


def test_validator_wrong_shape(tmp_path, data_dir):
    entries = _valid_entries()
    entries[1] = ("b2.tif", _tif(np.zeros((10, 10, 11), np.uint8)))
    probs = _problems(tmp_path, data_dir, entries)
    assert len(probs) == 1 and "b2.tif" in probs[0] and "shape" in probs[0]


def test_validator_wrong_dtype(tmp_path, data_dir):
    entries = _valid_entries()
    entries[0] = ("a1.tif", _tif(np.zeros(SHAPES["a1"], np.uint16)))
    probs = _problems(tmp_path, data_dir, entries)
    assert len(probs) == 1 and "dtype uint16" in probs[0]


def test_validator_reports_values_outside_0_1(tmp_path, data_dir):
    entries = _valid_entries()
    entries[2] = ("c3.tif", _tif(_masks()["c3"] * 255))
    probs = _problems(tmp_path, data_dir, entries)
    assert len(probs) == 1 and "values outside" in probs[0] and "max 255" in probs[0]


@pytest.mark.parametrize(
    "name, why",
    [("../a1.tif", "'..'"), ("sub/a1.tif", "folder"), ("/a1.tif", "absolute"),
     ("a1.tiff", ".tif"), ("sub/", "directory")],
)
def test_validator_bad_entry_names(tmp_path, data_dir, name, why):
    entries = _valid_entries() + [(name, _tif(np.zeros(SHAPES["a1"], np.uint8)))]
    probs = _problems(tmp_path, data_dir, entries)
    assert len(probs) == 1, probs
    assert why in probs[0] and repr(name) in probs[0]


def test_validator_traversal_entry_does_not_count_as_the_id(tmp_path, data_dir):
    entries = _valid_entries()
    entries[0] = ("../a1.tif", entries[0][1])
    probs = _problems(tmp_path, data_dir, entries)
    assert any("'..'" in p for p in probs) and any("missing" in p and "a1" in p for p in probs)


def test_validator_duplicate_entries(tmp_path, data_dir):
    probs = _problems(tmp_path, data_dir, _valid_entries() + [_valid_entries()[0]])
    assert any("a1.tif" in p and "2 times" in p for p in probs)


def test_validator_corrupt_tiff(tmp_path, data_dir):
    entries = _valid_entries()
    entries[1] = ("b2.tif", b"II*\x00garbage" + bytes(50))
    probs = _problems(tmp_path, data_dir, entries)
    assert len(probs) == 1 and "b2.tif" in probs[0] and "corrupt TIFF" in probs[0]


def test_validator_truncated_tiff(tmp_path, data_dir):
    entries = _valid_entries()
    data = _tif(np.random.default_rng(0).integers(0, 2, SHAPES["b2"], dtype=np.uint8))
    entries[1] = ("b2.tif", data[: len(data) // 2])
    probs = _problems(tmp_path, data_dir, entries)
    assert len(probs) == 1 and "b2.tif" in probs[0] and "corrupt TIFF" in probs[0]


def test_validator_not_a_zip(tmp_path, data_dir):
    path = tmp_path / "s.zip"
    path.write_bytes(b"this is not a zip file at all")
    assert validate_submission(path, data_dir) == [f"{path}: not a zip file"]
    assert "not found" in validate_submission(tmp_path / "nope.zip", data_dir)[0]


def test_read_tiff_shape_from_header(data_dir):
    assert read_tiff_shape(data_dir / "test_images" / "c3.tif") == SHAPES["c3"]


# ---------------------------------------------------------------------------------- TTA budget


def test_plan_tta_halves_until_it_fits():
    tta = ["id", "fz", "fy", "fx", "fzy", "fzx", "fyx", "fzyx"]
    assert plan_tta(tta, 10.0, 10, 1000.0) == tta            # 100 s needed: fits
    assert plan_tta(tta, 10.0, 10, 60.0) == tta[:4]          # 8 passes 100 s, 4 passes 50 s
    assert plan_tta(tta, 10.0, 10, 20.0) == tta[:1]          # 12.5 s: still too much, floor at 1
    assert plan_tta(tta, 10.0, 10, 1.0) == tta[:1]
    assert plan_tta(None, 10.0, 10, 1.0) is None
    assert plan_tta(tuple(tta), 10.0, 10, 60.0) == tuple(tta[:4])


# ---------------------------------------------------------------------------------- predict


class PointwiseNet(nn.Module):
    """1x1x1 conv: logit = 4*x - 0.3 (x the normalized intensity). Raises on inputs above ``fail_above``."""

    def __init__(self, fail_above: float | None = None):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(4.0)
            self.conv.bias.fill_(-0.3)
        self.fail_above = fail_above

    def forward(self, x):
        if self.fail_above is not None and float(x.max()) > self.fail_above:
            raise RuntimeError("simulated CUDA out of memory")
        return self.conv(x)


def _expected_mask(image: np.ndarray, mode: str, cfg: PostprocessConfig) -> np.ndarray:
    x = normalize_intensity(image, mode=mode)
    prob = 1.0 / (1.0 + np.exp(-(4.0 * x.astype(np.float64) - 0.3)))
    return postprocess(prob.astype(np.float32), cfg)


@pytest.fixture
def fake_inference(monkeypatch):
    """Whole-volume stand-in for inference.sliding_window_predict that records its kwargs."""
    calls: list[dict] = []

    def sliding_window_predict(models, volume, settings=None, **kwargs):
        calls.append({"tta": getattr(settings, "tta", None), **kwargs})  # a tta keyword replaces the settings' one
        x = torch.as_tensor(np.asarray(volume, np.float32))[None, None]
        with torch.inference_mode():
            logits = torch.stack([m(x) for m in models]).mean(0)
        return torch.sigmoid(logits)[0, 0].numpy()

    try:
        import kaggle_utils.inference as inf  # noqa: F401

        monkeypatch.setattr(inf, "sliding_window_predict", sliding_window_predict)
    except ImportError:
        @dataclass
        class InferenceConfig:
            tta: list | None = None

        mod = types.ModuleType("kaggle_utils.inference")
        mod.sliding_window_predict = sliding_window_predict
        mod.InferenceConfig = InferenceConfig
        monkeypatch.setitem(sys.modules, "kaggle_utils.inference", mod)
    return calls


def test_predict_dataset_end_to_end(tmp_path, data_dir, fake_inference):
    cfg = PostprocessConfig(threshold=0.5, min_component_size=2)
    out = tmp_path / "submission.zip"
    report = predict_dataset(models=[PointwiseNet()], data_dir=data_dir, out_zip=out,
                             postprocess_cfg=cfg, device="cpu", progress=False,
                             save_probs=tmp_path / "probs")
    assert isinstance(report, PredictReport)
    assert report.errors == {} and report.n_volumes == 3
    assert validate_submission(out, data_dir) == []
    with zipfile.ZipFile(out) as zf:
        for vid in SHAPES:
            got = tifffile.imread(io.BytesIO(zf.read(f"{vid}.tif")))
            image = tifffile.imread(data_dir / "test_images" / f"{vid}.tif")
            np.testing.assert_array_equal(got, _expected_mask(image, "zscore", cfg))
    # probabilities: compact uint8 .npz + JSON sidecar
    meta = json.loads((tmp_path / "probs" / "b2.json").read_text())
    assert meta["id"] == "b2" and meta["scroll_id"] == "101" and meta["shape"] == [10, 10, 10]
    probs = read_probs(tmp_path / "probs" / "b2.npz")
    assert probs.dtype == np.uint8 and probs.shape == SHAPES["b2"]
    assert [v["id"] for v in report.volumes] == list(SHAPES)
    assert all(c["device"] == "cpu" for c in fake_inference)


def test_predict_dataset_uses_requested_normalization(tmp_path, data_dir, fake_inference):
    out = tmp_path / "s.zip"
    predict_dataset(models=[PointwiseNet()], data_dir=data_dir, out_zip=out, normalization="fixed",
                    device="cpu", progress=False)
    with zipfile.ZipFile(out) as zf:
        got = tifffile.imread(io.BytesIO(zf.read("a1.tif")))
    image = tifffile.imread(data_dir / "test_images" / "a1.tif")
    np.testing.assert_array_equal(got, _expected_mask(image, "fixed", PostprocessConfig()))
    assert not np.array_equal(got, _expected_mask(image, "zscore", PostprocessConfig()))


def test_predict_dataset_survives_failing_volume(tmp_path, fake_inference):
    data_dir = _make_test_set(tmp_path / "d")
    write_volume(data_dir / "test_images" / "b2.tif", np.full(SHAPES["b2"], 255, np.uint8))
    out = tmp_path / "s.zip"
    with pytest.warns(RuntimeWarning) as record:
        report = predict_dataset(models=[PointwiseNet(fail_above=0.99)], data_dir=data_dir, out_zip=out,
                                 normalization="fixed", device="cpu", progress=False)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("b2: prediction failed") for m in messages)
    assert any("1 volume(s) failed and were submitted empty" in m for m in messages)
    assert list(report.errors) == ["b2"] and "out of memory" in report.errors["b2"]
    assert validate_submission(out, data_dir) == []
    with zipfile.ZipFile(out) as zf:
        assert tifffile.imread(io.BytesIO(zf.read("b2.tif"))).sum() == 0
        assert tifffile.imread(io.BytesIO(zf.read("a1.tif"))).sum() > 0


def test_predict_dataset_drops_tta_to_fit_time_budget(tmp_path, data_dir, fake_inference):
    from kaggle_utils.inference import TTATransform

    with pytest.warns(RuntimeWarning, match="dropping to 1 TTA"):
        report = predict_dataset(models=[PointwiseNet()], data_dir=data_dir, out_zip=tmp_path / "s.zip",
                                 inference_cfg={"tta": "flips"}, device="cpu", progress=False,
                                 time_limit_s=0.0)
    assert [c["tta"] for c in fake_inference] == ["flips", [TTATransform()], [TTATransform()]]
    assert report.tta == [TTATransform()] and any("time budget" in n for n in report.notes)
    assert [v["tta_passes"] for v in report.volumes] == [8, 1, 1]


def test_predict_dataset_keeps_tta_when_budget_allows(tmp_path, data_dir, fake_inference):
    report = predict_dataset(models=[PointwiseNet()], data_dir=data_dir, out_zip=tmp_path / "s.zip",
                             inference_cfg={"tta": "rot90"}, device="cpu", progress=False)
    assert [c["tta"] for c in fake_inference] == ["rot90"] * 3
    assert report.notes == [] and [v["tta_passes"] for v in report.volumes] == [4, 4, 4]


class RecordingNet(PointwiseNet):
    """PointwiseNet that records the spatial shape of every volume it is run on."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        return super().forward(x)


def test_zip_failure_keeps_staged_masks_and_rerun_reuses_them(tmp_path, data_dir, fake_inference):
    import kaggle_utils.submission as sub

    out = tmp_path / "submission.zip"
    parts = staging_dir(out)
    assert parts == tmp_path / "submission.zip.parts"
    cfg = PostprocessConfig(threshold=0.5)

    def broken_zip(items, out_zip, **kw):
        raise OSError(28, "No space left on device")

    seen: list = []
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SubmissionError) as info:
        mp.setattr(sub, "write_submission", broken_zip)
        predict_dataset(models=[RecordingNet(seen)], data_dir=data_dir, out_zip=out, postprocess_cfg=cfg,
                        device="cpu", progress=False)
    msg = str(info.value)
    assert "building the zip failed (OSError" in msg and "No space left" in msg
    assert f"the 3 predicted mask(s) are kept in {parts}" in msg
    assert sorted(seen) == sorted(SHAPES.values()) and not out.exists()
    expected = {vid: _expected_mask(tifffile.imread(data_dir / "test_images" / f"{vid}.tif"), "zscore", cfg)
                for vid in SHAPES}
    assert sorted(p.name for p in parts.glob("*.tif")) == sorted(f"{v}.tif" for v in SHAPES)
    for vid, mask in expected.items():
        np.testing.assert_array_equal(tifffile.imread(parts / f"{vid}.tif"), mask)

    # the zip writer works again; the rerun must not run the model at all
    seen2: list = []
    report = predict_dataset(models=[RecordingNet(seen2)], data_dir=data_dir, out_zip=out, postprocess_cfg=cfg,
                             device="cpu", progress=False)
    assert seen2 == [] and report.reused == list(SHAPES) and report.errors == {}
    assert any(n.startswith(f"reusing 3 staged mask(s) of an earlier run from {parts}") for n in report.notes)
    assert validate_submission(out, data_dir) == []
    with zipfile.ZipFile(out) as zf:
        for vid, mask in expected.items():
            np.testing.assert_array_equal(tifffile.imread(io.BytesIO(zf.read(f"{vid}.tif"))), mask)
    assert not parts.exists(), "staging folder removed after a zip that validated"


def test_rerun_predicts_only_missing_or_broken_staged_masks(tmp_path, data_dir, fake_inference):
    import kaggle_utils.submission as sub

    out = tmp_path / "s.zip"
    parts = staging_dir(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sub, "validate_submission", lambda *a: ["a1.tif: simulated problem"])
        with pytest.raises(SubmissionError, match=r"written but invalid .*a1.tif: simulated problem; the 3 predicted"):
            predict_dataset(models=[RecordingNet([])], data_dir=data_dir, out_zip=out, device="cpu", progress=False)
    (parts / "a1.tif").unlink()                           # interrupted before a1 was staged
    (parts / "b2.tif").write_bytes(b"II*\x00garbage")      # a damaged file
    tifffile.imwrite(parts / "zz.tif", np.zeros((2, 2, 2), np.uint8))  # not a test id: ignored
    seen: list = []
    report = predict_dataset(models=[RecordingNet(seen)], data_dir=data_dir, out_zip=out, device="cpu",
                             progress=False)
    assert sorted(seen) == sorted([SHAPES["a1"], SHAPES["b2"]]) and report.reused == ["c3"]
    assert [v["id"] for v in report.volumes] == ["c3", "a1", "b2"] and report.n_volumes == 3
    assert validate_submission(out, data_dir) == [] and not parts.exists()


def test_staged_masks_of_other_settings_are_not_reused(tmp_path, data_dir, fake_inference):
    import kaggle_utils.submission as sub

    out = tmp_path / "s.zip"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sub, "write_submission", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
        with pytest.raises(SubmissionError, match="kept in"):
            predict_dataset(models=[RecordingNet([])], data_dir=data_dir, out_zip=out, device="cpu", progress=False)
    seen: list = []
    report = predict_dataset(models=[RecordingNet(seen)], data_dir=data_dir, out_zip=out, device="cpu",
                             progress=False, postprocess_cfg=PostprocessConfig(threshold=0.9))
    assert sorted(seen) == sorted(SHAPES.values()) and report.reused == []


def test_predict_stops_on_missing_codec_instead_of_submitting_empty(tmp_path, data_dir, fake_inference,
                                                                   no_imagecodecs):
    from kaggle_utils.data import DataError, MissingCodecError

    out = tmp_path / "s.zip"
    with pytest.raises(MissingCodecError) as info:
        predict_dataset(models=[PointwiseNet()], data_dir=data_dir, out_zip=out, device="cpu", progress=False)
    assert isinstance(info.value, DataError)
    assert str(info.value).startswith(f"{data_dir / 'test_images' / 'a1.tif'}: LZW-compressed TIFF")
    assert "pip install imagecodecs" in str(info.value) and not out.exists()
    assert list(tmp_path.iterdir()) == [data_dir], "no zip and no staging folder left behind"


def test_predict_without_imagecodecs_on_zlib_images(tmp_path, fake_inference, no_imagecodecs):
    """The KeyError path: a run without imagecodecs used to end in KeyError writing LZW masks."""
    data_dir = tmp_path / "d"
    (data_dir / "test_images").mkdir(parents=True)
    (data_dir / "test.csv").write_text("id,scroll_id\na1,1\n")
    write_volume(data_dir / "test_images" / "a1.tif", np.arange(9 * 10 * 11, dtype=np.uint8).reshape(9, 10, 11),
                 compression="zlib")
    out = tmp_path / "s.zip"
    report = predict_dataset(models=[PointwiseNet()], data_dir=data_dir, out_zip=out, device="cpu", progress=False)
    assert report.errors == {} and validate_submission(out, data_dir) == []
    with zipfile.ZipFile(out) as zf:
        assert _pil_pages(zf.read("a1.tif")).shape == (9, 10, 11)


def _tiny_unet():
    from kaggle_utils.models import ModelConfig, build_model

    cfg = ModelConfig(decoder_channels=[16, 8, 8, 4, 4])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


@pytest.mark.slow
def test_predict_dataset_from_checkpoints_real_inference(tmp_path, data_dir):
    """End to end through models.save_checkpoint/load_checkpoint and the real sliding window."""
    from kaggle_utils.config import to_dict
    from kaggle_utils.inference import sliding_window_predict
    from kaggle_utils.models import save_checkpoint

    mcfg, model = _tiny_unet()
    config = {"sampler": {"normalization": "fixed"}, "train": {"fold": 2},
              "inference": {"patch_size": [32, 32, 32], "overlap": 0.25, "batch_size": 2, "tta": "none"},
              "postprocess": {"threshold": 0.5}}
    ckpt = save_checkpoint(tmp_path / "m.pt", model=model, model_config=to_dict(mcfg), config=config)
    out = tmp_path / "submission.zip"
    report = predict_dataset([ckpt], data_dir, out, device="cpu", progress=False, save_probs=tmp_path / "p")
    assert report.errors == {} and validate_submission(out, data_dir) == []
    assert json.loads((tmp_path / "p" / "a1.json").read_text())["fold"] == 2
    image = tifffile.imread(data_dir / "test_images" / "a1.tif")
    prob = sliding_window_predict([model], normalize_intensity(image, mode="fixed"), (32, 32, 32),
                                  overlap=0.25, batch_size=2, device="cpu", amp=False)
    with zipfile.ZipFile(out) as zf:
        got = tifffile.imread(io.BytesIO(zf.read("a1.tif")))
    np.testing.assert_array_equal(got, (prob > 0.5).astype(np.uint8))
    saved = as_probability(read_probs(tmp_path / "p" / "a1.npz"))
    np.testing.assert_allclose(saved, prob, atol=1 / 510 + 1e-6)


def test_predict_dataset_rejects_mixed_normalizations(tmp_path, data_dir):
    from kaggle_utils.config import to_dict
    from kaggle_utils.models import save_checkpoint

    mcfg, model = _tiny_unet()
    paths = [save_checkpoint(tmp_path / f"m{i}.pt", model=model, model_config=to_dict(mcfg),
                             config={"sampler": {"normalization": mode}})
             for i, mode in enumerate(("fixed", "zscore"))]
    from kaggle_utils.predict import PredictError

    with pytest.raises(PredictError, match="normalization"):
        predict_dataset(paths, data_dir, tmp_path / "s.zip", device="cpu", progress=False)
    assert not (tmp_path / "s.zip").exists()


def test_predict_dataset_argument_errors(tmp_path, data_dir):
    from kaggle_utils.predict import PredictError

    with pytest.raises(PredictError, match="exactly one"):
        predict_dataset(data_dir=data_dir, out_zip=tmp_path / "s.zip")
    with pytest.raises(PredictError, match="data_dir is required"):
        predict_dataset(models=[], out_zip=tmp_path / "s.zip")


# ---------------------------------------------------------------------------------- CLI


def test_cli_validate_submission(tmp_path, data_dir, capsys):
    from kaggle_utils.cli import main

    good = write_submission(_masks().items(), tmp_path / "good.zip")
    assert main(["validate-submission", str(good), "--data-dir", str(data_dir)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = _zip(tmp_path / "bad.zip", _valid_entries()[:2])
    assert main(["validate-submission", str(bad), "--data-dir", str(data_dir)]) == 1
    assert "missing" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_predict(tmp_path, capsys):
    from kaggle_utils.cli import main
    from kaggle_utils.config import to_dict
    from kaggle_utils.models import save_checkpoint
    from kaggle_utils.postprocess import save_postprocess

    data_dir = _make_test_set(tmp_path / "data", {"c3": SHAPES["c3"]})
    mcfg, model = _tiny_unet()
    ckpt = save_checkpoint(tmp_path / "m.pt", model=model, model_config=to_dict(mcfg),
                           config={"sampler": {"normalization": "zscore"}})
    (tmp_path / "infer.yaml").write_text("inference:\n  patch_size: [32, 32, 32]\n  overlap: 0.0\n")
    save_postprocess(PostprocessConfig(threshold=0.0), tmp_path / "pp.yaml")  # everything foreground
    out = tmp_path / "submission.zip"
    rc = main(["predict", "--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--out", str(out),
               "--config", str(tmp_path / "infer.yaml"), "--postprocess", str(tmp_path / "pp.yaml"),
               "--device", "cpu", "--tta", "rot90", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_volumes"] == 1 and report["errors"] == {}
    assert [v["tta_passes"] for v in report["volumes"]] == [4]
    with zipfile.ZipFile(out) as zf:
        assert (tifffile.imread(io.BytesIO(zf.read("c3.tif"))) == 1).all()
    # a config typo is a one-line error with exit status 2, naming the file and key
    (tmp_path / "bad.yaml").write_text("patch_sise: [32, 32, 32]\n")
    rc = main(["predict", "--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--out", str(out),
               "--config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.yaml" in err and "patch_sise" in err


def test_predict_report_summary_names_failures(tmp_path):
    rep = PredictReport(tmp_path / "s.zip", n_volumes=3, seconds=12.3, errors={"7": "CUDA out of memory"},
                        notes=["TTA reduced to 4 passes"], code_version="0.1.0 (commit abc)")
    lines = str(rep).splitlines()
    assert lines == ["note: TTA reduced to 4 passes", "error: 7: CUDA out of memory",
                     f"wrote {tmp_path / 's.zip'}: 3 volume(s) in 12 s, 1 failed (submitted empty), validated"
                     " (kaggle_utils 0.1.0 (commit abc))"]
