"""Every command this file covers (score, synth, diagnose, check-data, validate-submission) run on
every fault fixture: the answer is numbers or one clear line, never a traceback.

The fixtures are built once in code (a tiny synthetic data set whose test split holds the same
volumes as its training split, so one zip serves ``score`` against labels, ``diagnose`` and
``validate-submission`` against test images). predict and train are covered by their own tests.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from kaggle_utils.cli import main as cli_main
from kaggle_utils.data import load_index, read_label, read_volume

# ------------------------------------------------------------------------------------- fixtures


def _tif(arr: np.ndarray, compression: str | None = "zlib") -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack", compression=compression)
    return buf.getvalue()


def _truncated_to_one_page(arr: np.ndarray) -> bytes:
    """A zlib multi-page TIFF cut so that tifffile still reads its first page as a 2D image."""
    data = _tif(arr)
    for cut in range(len(data) // arr.shape[0], len(data)):
        logging.disable(logging.CRITICAL)
        try:
            if tifffile.imread(io.BytesIO(data[:cut])).shape == arr.shape[1:]:
                return data[:cut]
        except Exception:
            continue
        finally:
            logging.disable(logging.NOTSET)
    raise AssertionError("no cut reads as a single page")  # pragma: no cover


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict:
    from kaggle_utils.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("faults")
    data = generate_dataset(root / "data", n_train=2, n_test=0, size=32, n_scrolls=1, seed=3)
    # the test split = the training volumes, so submissions can be validated and scored alike
    shutil.copytree(data / "train_images", data / "test_images", dirs_exist_ok=True)
    shutil.copy(data / "train.csv", data / "test.csv")
    index = load_index(data, "train")
    labels = {r.id: read_label(r.label_path) for r in index}
    masks = {i: (lab == 1).astype(np.uint8) for i, lab in labels.items()}
    rng = np.random.default_rng(0)
    first = next(iter(masks))

    def write_zip(name: str, entries: dict[str, bytes]) -> Path:
        path = root / f"{name}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for member, blob in entries.items():
                zf.writestr(member, blob)
        return path

    zips = {
        "good": write_zip("good", {f"{i}.tif": _tif(m) for i, m in masks.items()}),
        "soft": write_zip("soft", {f"{i}.tif": _tif((0.7 * m + 0.3 * rng.random(m.shape)).astype(np.float32))
                                   for i, m in masks.items()}),
        "u255": write_zip("u255", {f"{i}.tif": _tif(m * np.uint8(255)) for i, m in masks.items()}),
        "uint16": write_zip("uint16", {f"{i}.tif": _tif(m.astype(np.uint16)) for i, m in masks.items()}),
        "nested": write_zip("nested", {f"preds/{i}.tif": _tif(m) for i, m in masks.items()}),
        "truncated": write_zip("truncated", {f"{i}.tif": (_truncated_to_one_page(m) if i == first else _tif(m))
                                             for i, m in masks.items()}),
        "garbage": write_zip("garbage", {f"{i}.tif": (b"II*\x00garbage" + bytes(64) if i == first else _tif(m))
                                         for i, m in masks.items()}),
        "missing": write_zip("missing", {f"{first}.tif": _tif(masks[first])}),
        "wrong_shape": write_zip("wrong_shape", {f"{i}.tif": _tif(np.zeros((5, 6, 7), np.uint8)) for i in masks}),
        "empty_zip": write_zip("empty_zip", {}),
    }
    not_a_zip = root / "not_a_zip.zip"
    not_a_zip.write_bytes(b"this is not a zip")
    zips["not_a_zip"] = not_a_zip
    zips["no_such_file"] = root / "nope.zip"

    # broken data folders: a truncated training image, a label with value 7, no CSV at all
    bad_image = root / "bad_image"
    shutil.copytree(data, bad_image)
    img = bad_image / "train_images" / f"{first}.tif"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    bad_label = root / "bad_label"
    shutil.copytree(data, bad_label)
    lab = labels[first].copy()
    lab[5, 5, 5] = 7
    tifffile.imwrite(bad_label / "train_labels" / f"{first}.tif", lab, photometric="minisblack")
    no_csv = root / "no_csv"
    no_csv.mkdir()
    dirs = {"good": data, "bad_image": bad_image, "bad_label": bad_label, "no_csv": no_csv, "missing_dir": root / "nope"}
    return {"root": root, "zips": zips, "dirs": dirs, "masks": masks, "first": first, "shape": masks[first].shape}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; an exception escaping ``main`` is a test failure (a user would see a traceback)."""
    try:
        rc = cli_main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = int(exc.code or 0)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err, out.out + out.err
    return rc, out.out, out.err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------- the rows


def test_score_soft_probabilities_warns_and_scores_like_the_official_scorer(faults, capsys):
    rc, out, err = _run(["score", str(faults["zips"]["soft"]), str(faults["dirs"]["good"])], capsys)
    assert rc == 0 and "mean" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(faults["masks"])
    assert all("not binary" in w and "soft.zip:" in w and ".tif" in w for w in warnings)
    # same numbers as without the warning: every non-zero voxel is foreground
    from kaggle_utils.metrics import score_dataset

    res = score_dataset(faults["zips"]["soft"], faults["dirs"]["good"], progress=False)
    assert f"{res.mean:7.4f}" in out and len(res.warnings) == len(warnings)


@pytest.mark.parametrize("kind, needle", [("u255", "not binary (values 0..255)"), ("uint16", "unexpected dtype uint16"),
                                          ("nested", "inside a folder")])
def test_score_odd_but_scorable_inputs_give_same_numbers_plus_one_line_each(faults, capsys, kind, needle):
    rc_good, out_good, err_good = _run(["score", str(faults["zips"]["good"]), str(faults["dirs"]["good"])], capsys)
    assert rc_good == 0 and "warning" not in err_good
    rc, out, err = _run(["score", str(faults["zips"][kind]), str(faults["dirs"]["good"])], capsys)
    assert rc == 0
    assert out == out_good  # the same table: the official scorer counts these exactly like 0/1 uint8
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(faults["masks"]) and all(needle in w for w in warnings), err
    assert all(f"{kind}.zip" in w for w in warnings)


def test_score_truncated_tiff_is_corrupt_not_a_shape_mismatch(faults, capsys):
    rc, out, err = _run(["score", str(faults["zips"]["truncated"]), str(faults["dirs"]["good"])], capsys)
    assert rc == 2
    lines = _error_lines(err)
    assert len(lines) == 1 and "corrupt TIFF" in lines[0] and f"truncated.zip:{faults['first']}.tif" in lines[0]
    assert "does not match" not in lines[0]


def test_truncated_tiff_fixture_really_reads_as_one_page(faults):
    """The fixture reproduces the reported case: tifffile alone returns the first page, 2D."""
    with zipfile.ZipFile(faults["zips"]["truncated"]) as zf:
        blob = zf.read(f"{faults['first']}.tif")
    logging.disable(logging.CRITICAL)
    try:
        assert tifffile.imread(io.BytesIO(blob)).shape == faults["shape"][1:]
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("argv, needle", [
    (["--size", "10"], "size must be >= 32, got 10"),
    (["--size", "100000"], "size must be <= 512"),
    (["--n-train", "0"], "n_train must be >= 1"),
    (["--n-test", "-1"], "n_test must be >= 0"),
    (["--n-scrolls", "0"], "n_scrolls must be >= 1"),
])
def test_synth_bad_arguments_one_line(tmp_path, capsys, argv, needle):
    rc, out, err = _run(["synth", "--out", str(tmp_path / "s"), *argv], capsys)
    assert rc == 2 and err.strip().splitlines() == [f"error: synth: {needle}" + err.strip().split(needle, 1)[1]]
    assert not (tmp_path / "s").exists()


def test_synth_out_is_a_file_or_unwritable_one_line(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for out_dir in (f, f / "sub"):
        rc, out, err = _run(["synth", "--out", str(out_dir), "--size", "32", "--n-train", "1", "--n-test", "0"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and str(f) in err and err.startswith("error: synth:")


@pytest.mark.parametrize("command", ["synth", "score", "diagnose", "check-data", "validate-submission"])
def test_device_option_is_refused_in_one_line(faults, capsys, command):
    """None of these commands runs a model: ``--device cuda`` (GPU or not) is an argparse error, no traceback."""
    positional = {"synth": ["--out", str(faults["root"] / "x")], "score": ["a.zip", "b"], "diagnose": ["a.zip"],
                  "check-data": ["d"], "validate-submission": ["a.zip"]}[command]
    rc, out, err = _run([command, *positional, "--device", "cuda"], capsys)
    assert rc == 2 and "unrecognized arguments: --device cuda" in err


def test_synth_size_10_subprocess_prints_one_line(tmp_path):
    """The real process, as a user runs it: one line on stderr, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "kaggle_utils", "synth", "--out", str(tmp_path / "s"), "--size", "10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: synth: size must be >= 32, got 10"


# ------------------------------------------------------------------ every command x every fault

ZIP_FAULTS = ["good", "soft", "u255", "uint16", "nested", "truncated", "garbage", "missing", "wrong_shape",
              "empty_zip", "not_a_zip", "no_such_file"]
DIR_FAULTS = ["good", "bad_image", "bad_label", "no_csv", "missing_dir"]


@pytest.mark.parametrize("fault", ZIP_FAULTS)
@pytest.mark.parametrize("command", ["score", "diagnose", "validate-submission"])
def test_prediction_faults_never_trace_back(faults, capsys, tmp_path, command, fault):
    z, data = str(faults["zips"][fault]), str(faults["dirs"]["good"])
    argv = {"score": ["score", z, data],
            "diagnose": ["diagnose", z, "--data-dir", data, "--out", str(tmp_path / "r.png")],
            "validate-submission": ["validate-submission", z, "--data-dir", data]}[command]
    rc, out, err = _run(argv, capsys)
    errors = _error_lines(err)
    if rc == 2:
        assert len(errors) == 1, err
    if fault == "good":
        assert rc == 0 and not errors
    if fault in ("truncated", "garbage") and command != "validate-submission":
        assert rc == 2 and "corrupt TIFF" in errors[0] and faults["first"] in errors[0]


@pytest.mark.parametrize("fault", DIR_FAULTS)
@pytest.mark.parametrize("command", ["score", "diagnose", "check-data", "validate-submission"])
def test_data_folder_faults_never_trace_back(faults, capsys, tmp_path, command, fault):
    z, data = str(faults["zips"]["good"]), str(faults["dirs"][fault])
    argv = {"score": ["score", z, data],
            "diagnose": ["diagnose", z, "--data-dir", data, "--out", str(tmp_path / "r.png")],
            "check-data": ["check-data", data],
            "validate-submission": ["validate-submission", z, "--data-dir", data]}[command]
    rc, out, err = _run(argv, capsys)
    if rc == 2:
        assert len(_error_lines(err)) == 1, err
    if fault == "good":
        assert rc == 0
    if command == "check-data" and fault in ("bad_image", "bad_label"):
        assert rc == 1 and faults["first"] in out


def test_fixture_volumes_are_what_the_faults_claim(faults):
    assert read_volume(faults["dirs"]["good"] / "test_images" / f"{faults['first']}.tif").shape == faults["shape"]


def test_score_ignores_macos_zip_clutter_with_a_warning_naming_it(faults, capsys, tmp_path):
    """A Finder-made zip carries __MACOSX/ and .DS_Store: the real {id}.tif entries are scored, the clutter
    is named in one warning, and a correct copy under __MACOSX/ never stands in for a wrong real entry."""
    rc_good, out_good, _ = _run(["score", str(faults["zips"]["good"]), str(faults["dirs"]["good"])], capsys)
    zeros = tmp_path / "zeros.zip"
    with zipfile.ZipFile(zeros, "w") as zf:
        for i, m in faults["masks"].items():
            zf.writestr(f"{i}.tif", _tif(np.zeros_like(m)))
    rc_zero, out_zero, _ = _run(["score", str(zeros), str(faults["dirs"]["good"])], capsys)
    for real, expect in ((faults["zips"]["good"], out_good), (zeros, out_zero)):
        mac = tmp_path / f"mac-{real.name}"
        shutil.copy(real, mac)
        with zipfile.ZipFile(mac, "a") as zf:
            zf.writestr(".DS_Store", b"\x00\x00\x00\x01Bud1")
            zf.writestr("__MACOSX/", b"")
            for i, m in faults["masks"].items():
                zf.writestr(f"__MACOSX/._{i}.tif", b"\x00\x05\x16\x07 AppleDouble")
                zf.writestr(f"__MACOSX/{i}.tif", _tif(m))  # the right answer, in the wrong place
        rc, out, err = _run(["score", str(mac), str(faults["dirs"]["good"])], capsys)
        assert rc == 0 and out == expect, err  # the zeros zip still scores like zeros, not 1.0
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and ".DS_Store" in warnings[0] and "__MACOSX/" in warnings[0], err
    assert out_zero != out_good



@pytest.mark.parametrize("command", ["score", "tune"])
@pytest.mark.parametrize("value", ["-3", "0", "two"])
def test_workers_below_one_is_refused_in_one_line_on_every_command_that_takes_it(faults, capsys, command, value):
    argv = {"score": ["score", "a.zip", "b"], "tune": ["tune", "--probs", "p"]}[command]
    rc, out, err = _run([*argv, "--workers", value], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"error: {command}: argument --workers: "), err
    assert (">= 1" in err) and value in err


def test_every_workers_option_uses_the_checked_type():
    from kaggle_utils.cli import _workers_arg, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    takers = {name: a for name, p in sub.choices.items() for a in p._actions if a.dest == "workers"}
    assert set(takers) >= {"score", "tune"} and all(a.type is _workers_arg for a in takers.values())
