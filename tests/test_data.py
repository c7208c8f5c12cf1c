"""Data I/O, dataset index, folds, normalization: round trips and one test per bad-input kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from kaggle_utils import cli
from kaggle_utils.data import (
    DataError,
    DatasetIndex,
    VolumeRecord,
    check_data,
    intensity_stats,
    load_index,
    make_folds,
    normalize_intensity,
    read_label,
    read_volume,
    split_fold,
    write_volume,
)


def _label(shape=(8, 10, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=shape, dtype=np.uint8)


def _make_dataset(root: Path, ids_scrolls: list[tuple[str, str]], shape=(8, 10, 12), test_ids=("900",)) -> Path:
    (root / "train_images").mkdir(parents=True)
    (root / "train_labels").mkdir()
    (root / "test_images").mkdir()
    rows = ["id,scroll_id"]
    for i, (vid, scroll) in enumerate(ids_scrolls):
        rows.append(f"{vid},{scroll}")
        write_volume(root / "train_images" / f"{vid}.tif", _label(shape, i) * 60)
        write_volume(root / "train_labels" / f"{vid}.tif", _label(shape, i))
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "test.csv").write_text("id,scroll_id\n" + "".join(f"{t},1\n" for t in test_ids))
    for t in test_ids:
        write_volume(root / "test_images" / f"{t}.tif", _label(shape, 99) * 60)
    return root


@pytest.fixture
def dataset(tmp_path) -> Path:
    return _make_dataset(tmp_path / "data", [("10", "a"), ("11", "a"), ("12", "b"), ("13", "c"), ("14", "c"), ("15", "d")])


# ---------------------------------------------------------------- round trips


def test_write_read_round_trip_lzw(tmp_path):
    vol = _label((5, 7, 9)) * 100
    path = write_volume(tmp_path / "v.tif", vol)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.LZW
        assert len(tif.pages) == 5
    out = read_volume(path)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 9)
    np.testing.assert_array_equal(out, vol)
    assert not list(tmp_path.glob(".*tmp")), "no temp file left behind"


def test_read_label_values(tmp_path):
    lbl = _label()
    np.testing.assert_array_equal(read_label(write_volume(tmp_path / "l.tif", lbl)), lbl)


def test_index_and_ids(dataset):
    index = load_index(dataset, "train")
    assert index.ids == ["10", "11", "12", "13", "14", "15"]
    assert index.scroll_ids == ["a", "b", "c", "d"]
    assert index.by_id("12").label_path == dataset / "train_labels" / "12.tif"
    test = load_index(dataset, "test")
    assert test.ids == ["900"] and test.records[0].label_path is None


def test_deprecated_ids_are_skipped(dataset):
    (dataset / "deprecated_train_images").mkdir()
    write_volume(dataset / "deprecated_train_images" / "77.tif", _label())
    with open(dataset / "train.csv", "a") as fh:
        fh.write("77,a\n")
    index = load_index(dataset, "train")
    assert "77" not in index.ids and index.skipped == ["77"]


# ---------------------------------------------------------------- folds


def test_folds_grouped_by_scroll_and_deterministic(dataset):
    index = load_index(dataset, "train")
    folds = make_folds(index, n_folds=3)
    assert folds == make_folds(index, n_folds=3)
    by_scroll: dict[str, set[int]] = {}
    for r in index:
        by_scroll.setdefault(r.scroll_id, set()).add(folds[r.id])
    assert all(len(f) == 1 for f in by_scroll.values()), by_scroll
    assert set(folds.values()) == {0, 1, 2}
    for fold in range(3):
        train, val = split_fold(index, fold, 3)
        assert not {r.scroll_id for r in train} & {r.scroll_id for r in val}
        assert len(train) + len(val) == len(index)


def test_folds_balance_real_scroll_sizes(tmp_path):
    sizes = {"34117": 382, "35360": 176, "26010": 130, "26002": 88, "44430": 17, "53997": 13}
    recs = [VolumeRecord(f"{s}_{i}", s, tmp_path / "x.tif") for s, n in sizes.items() for i in range(n)]
    folds = make_folds(DatasetIndex(tmp_path, "train", recs), n_folds=5)
    counts = np.bincount(list(folds.values()), minlength=5)
    assert counts.sum() == 806 and counts.max() == 382  # the big scroll alone in its fold
    assert counts.tolist() == [382, 176, 130, 88, 30]  # 44430 + 53997 share the last fold


def test_too_few_scrolls_for_folds(dataset):
    with pytest.raises(DataError, match="4 scroll_id.*cannot make 5"):
        make_folds(load_index(dataset, "train"), n_folds=5)


# ---------------------------------------------------------------- normalization


def test_normalize_zscore_patch_equals_volume_slice():
    vol = np.random.default_rng(0).integers(0, 256, (16, 16, 16), dtype=np.uint8)
    stats = intensity_stats(vol)
    full = normalize_intensity(vol, stats)
    patch = normalize_intensity(vol[2:10, 3:9, 4:12], stats)
    np.testing.assert_array_equal(patch, full[2:10, 3:9, 4:12])
    assert full.dtype == np.float32
    clipped = np.clip(vol.astype(np.float64), stats.lo, stats.hi)
    assert abs(full.mean()) < 1e-4 and abs(full.std() - 1) < 1e-3
    np.testing.assert_allclose(stats.mean, clipped.mean(), rtol=1e-9)


def test_normalize_fixed_and_bad_mode():
    vol = np.array([[[0, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(normalize_intensity(vol, mode="fixed"), [[[-1.0, 1.0]]])
    with pytest.raises(ValueError, match="normalization mode"):
        normalize_intensity(vol, mode="minmax")


# ---------------------------------------------------------------- bad input, one test per kind


def test_missing_csv(tmp_path):
    (tmp_path / "train_images").mkdir()
    with pytest.raises(DataError, match=r"train\.csv: CSV file not found"):
        load_index(tmp_path, "train")


def test_empty_csv(dataset):
    (dataset / "train.csv").write_text("")
    with pytest.raises(DataError, match=r"train\.csv: empty CSV"):
        load_index(dataset, "train")


def test_csv_header_only(dataset):
    (dataset / "train.csv").write_text("id,scroll_id\n")
    with pytest.raises(DataError, match="header but no rows"):
        load_index(dataset, "train")


def test_csv_without_id_column(dataset):
    (dataset / "train.csv").write_text("name,scroll_id\n10,a\n")
    with pytest.raises(DataError, match="no 'id' column"):
        load_index(dataset, "train")


def test_csv_saved_by_excel_bom_and_crlf_reads_like_plain(dataset):
    """Excel's "CSV UTF-8" adds a byte-order mark and CRLF line ends; ids and scrolls must come out the same."""
    plain = load_index(dataset, "train")
    for split in ("train", "test"):
        text = (dataset / f"{split}.csv").read_text()
        (dataset / f"{split}.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    excel = load_index(dataset, "train")
    assert excel.ids == plain.ids and excel.scroll_ids == plain.scroll_ids
    assert load_index(dataset, "test").ids == ["900"]


def test_csv_not_utf8_is_one_line(dataset):
    (dataset / "train.csv").write_bytes("id,scroll_id\n10,\xe9\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"train\.csv: not UTF-8"):
        load_index(dataset, "train")


def test_id_without_file(dataset):
    with open(dataset / "train.csv", "a") as fh:
        fh.write("404,a\n")
    with pytest.raises(DataError, match=r"1 id\(s\) without an image file.*404\.tif"):
        load_index(dataset, "train")


def test_id_without_label(dataset):
    (dataset / "train_labels" / "11.tif").unlink()
    with pytest.raises(DataError, match=r"11\.tif: label file not found for id '11'"):
        load_index(dataset, "train")


def test_file_without_id(dataset):
    write_volume(dataset / "train_images" / "555.tif", _label())
    with pytest.raises(DataError, match=r"file\(s\) without an id in train\.csv.*555\.tif"):
        load_index(dataset, "train")


def test_not_3d_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"flat\.tif: expected a 3D volume.*got 2D"):
        read_volume(tmp_path / "flat.tif")


def test_4d_tiff(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 10, 12, 3), np.uint8))
    with pytest.raises(DataError, match=r"rgb\.tif: expected a 3D volume.*got 4D"):
        read_volume(tmp_path / "rgb.tif")


def test_wrong_dtype(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((4, 10, 12), np.float32), photometric="minisblack")
    with pytest.raises(DataError, match=r"f\.tif: expected dtype uint8, got float32"):
        read_volume(tmp_path / "f.tif")


def test_label_values_outside_012(tmp_path):
    lbl = _label()
    lbl[0, 0, 0] = 255
    lbl[1, 1, 1] = 3
    write_volume(tmp_path / "l.tif", lbl)
    with pytest.raises(DataError, match=r"l\.tif: label values must be in \{0, 1, 2\}, found \[3, 255\]"):
        read_label(tmp_path / "l.tif")


def test_truncated_tiff(tmp_path):
    path = write_volume(tmp_path / "t.tif", _label((20, 32, 32)) * 50)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"t\.tif: (corrupt TIFF|expected a 3D)"):
        read_volume(path)


def test_corrupt_tiff(tmp_path):
    (tmp_path / "c.tif").write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(DataError, match=r"c\.tif: corrupt TIFF, truncated or damaged"):
        read_volume(tmp_path / "c.tif")


def test_empty_tiff_file(tmp_path):
    (tmp_path / "e.tif").write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.tif: empty file"):
        read_volume(tmp_path / "e.tif")


def test_directory_where_file_should_be(dataset):
    (dataset / "train_images" / "12.tif").unlink()
    (dataset / "train_images" / "12.tif").mkdir()
    with pytest.raises(DataError, match=r"12\.tif: is a directory"):
        load_index(dataset, "train")
    with pytest.raises(DataError, match=r"12\.tif: is a directory"):
        read_volume(dataset / "train_images" / "12.tif")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tif: file not found"):
        read_volume(tmp_path / "nope.tif")


def test_image_label_shape_mismatch_reported(dataset):
    write_volume(dataset / "train_labels" / "13.tif", _label((8, 10, 11)))
    rows = {r["id"]: r for r in check_data(dataset)}
    assert rows["13"]["problems"] and "label shape (8, 10, 11) != image shape (8, 10, 12)" in rows["13"]["problems"][0]
    assert not rows["10"]["problems"]


# ---------------------------------------------------------------- check-data CLI


def test_check_data_cli_reports_shares(dataset, capsys):
    assert cli.main(["check-data", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "surface share over 6 labelled volumes" in out
    assert "7 volume(s), 0 with problems" in out


def test_check_data_cli_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["check-data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data directory not found" in err and "Traceback" not in err


def test_check_data_cli_flags_bad_volume(dataset, capsys):
    lbl = _label()
    lbl[0, 0, 0] = 7
    write_volume(dataset / "train_labels" / "10.tif", lbl)
    assert cli.main(["check-data", str(dataset)]) == 1
    assert "label values must be in {0, 1, 2}, found [7]" in capsys.readouterr().out


def test_written_files_get_the_usual_mode(tmp_path):
    import os
    import stat

    path = write_volume(tmp_path / "m.tif", _label())
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_write_probs_round_trip(tmp_path):
    import json

    import kaggle_utils.data
    from kaggle_utils.probs import write_probs

    with pytest.raises(AttributeError, match=r"^kaggle_utils.data.write_probs moved: use kaggle_utils.probs.write_probs$"):
        kaggle_utils.data.write_probs  # noqa: B018
    prob = np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    npy = write_probs(tmp_path / "oof", "17", "34117", prob, 2, fmt="float16", epoch=5)  # the old format
    back = np.load(npy)
    assert back.dtype == np.float16 and back.shape == (2, 3, 4)
    np.testing.assert_allclose(back, prob, atol=1e-3)
    meta = json.loads((tmp_path / "oof" / "17.json").read_text())
    assert meta == {"id": "17", "scroll_id": "34117", "fold": 2, "shape": [2, 3, 4], "dtype": "float16", "epoch": 5}


# ---------------------------------------------------------------- codecs (Kaggle's image has no imagecodecs)


def test_lzw_without_imagecodecs_names_file_and_package(tmp_path, no_imagecodecs):
    from kaggle_utils.data import MissingCodecError

    vol = _label((4, 6, 8))
    tifffile.imwrite(tmp_path / "a.tif", vol, compression=None, photometric="minisblack")
    path = tmp_path / "lzw.tif"
    path.write_bytes(_LZW_BYTES)  # a competition-style LZW volume, made while imagecodecs was there
    with pytest.raises(MissingCodecError) as info:
        read_volume(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: LZW-compressed TIFF")
    assert "'imagecodecs' package, which is not installed" in msg and "pip install imagecodecs" in msg
    assert "corrupt" not in msg and "\n" not in msg
    assert isinstance(info.value, DataError)  # the CLI prints it as one line
    # uncompressed and zlib files still read without imagecodecs
    np.testing.assert_array_equal(read_volume(tmp_path / "a.tif"), vol)
    write_volume(tmp_path / "z.tif", vol, compression="zlib")
    np.testing.assert_array_equal(read_volume(tmp_path / "z.tif"), vol)


def test_corrupt_file_is_not_reported_as_missing_codec(tmp_path, no_imagecodecs):
    from kaggle_utils.data import MissingCodecError

    path = write_volume(tmp_path / "t.tif", _label((20, 32, 32)) * 50, compression="zlib")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:  # garble the first strip's compressed bytes
        offset = tif.pages[0].dataoffsets[0]
    data[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"t\.tif: corrupt TIFF, truncated or damaged") as info:
        read_volume(path)
    assert not isinstance(info.value, MissingCodecError)


def test_writing_lzw_without_imagecodecs_is_a_clear_error(tmp_path, no_imagecodecs):
    from kaggle_utils.data import MissingCodecError

    with pytest.raises(MissingCodecError, match=r"w\.tif: LZW-compressed TIFF; tifffile cannot encode LZW"):
        write_volume(tmp_path / "w.tif", _label(), compression="lzw")
    assert list(tmp_path.iterdir()) == []


def test_check_data_cli_missing_codec(dataset, capsys, no_imagecodecs):
    assert cli.main(["check-data", str(dataset)]) == 1
    out = capsys.readouterr().out
    assert "LZW-compressed TIFF" in out and "pip install imagecodecs" in out and "corrupt" not in out


def _lzw_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    tifffile.imwrite(buf, _label((4, 6, 8)), compression="lzw", photometric="minisblack")
    return buf.getvalue()


_LZW_BYTES = _lzw_bytes()  # at import time, while imagecodecs is still available


def test_check_tiff_header_reads_shapes_and_finds_truncation_without_decoding(tmp_path):
    from kaggle_utils.data import check_tiff_header

    vol = _label((12, 10, 9)) * 60
    path = write_volume(tmp_path / "v.tif", vol, compression="zlib")
    assert check_tiff_header(path) == (12, 10, 9)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 3):  # the IFD chain broken; only the last page's data cut short
        (tmp_path / "cut.tif").write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"cut\.tif: corrupt TIFF, truncated or damaged"):
            check_tiff_header(tmp_path / "cut.tif")
    tifffile.imwrite(tmp_path / "u16.tif", vol.astype(np.uint16))
    with pytest.raises(DataError, match="expected dtype uint8"):
        check_tiff_header(tmp_path / "u16.tif")
