"""Tests for kaggle_utils.predict: one inference path (train's out-of-fold probabilities equal
``predict --save-probs``) and predict's faults (bad checkpoints, bad --out, unreadable or 4D test
images, signals, a missing GPU), each a one-line message, and the CLI never shows a traceback."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from kaggle_utils.probs import read_probs

warnings.filterwarnings("ignore", category=FutureWarning)

# A tiny run: 32^3 windows over 64^3 synthetic volumes, one epoch, a thin decoder.
TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 4]},
    "loss": {"name": "default"},
    "sampler": {"patch_size": [32, 32, 32], "patches_per_epoch": 4, "surface_share": 0.7},
    "augment": {"p_affine": 0.0, "p_blur": 0.0},
    "optim": {"lr": 0.002, "warmup_epochs": 1},
    "train": {"epochs": 1, "batch_size": 2, "num_workers": 0, "seed": 3, "n_folds": 3},
    "validation": {"every": 1, "n_volumes": 1, "n_score": 0, "patch_size": [32, 32, 32], "batch_size": 2,
                   "overlap": 0.0},
    "inference": {"patch_size": [32, 32, 32], "overlap": 0.0, "ensemble": "logits", "tta": "rot90"},
    "postprocess": {"threshold": 0.5},
}


def _test_set_of(data_dir: Path, ids: list[str], dst: Path) -> Path:
    """A competition folder whose test set is the train volumes ``ids`` of ``data_dir``."""
    rows = {r["id"]: r for r in csv.DictReader((data_dir / "train.csv").open())}
    (dst / "test_images").mkdir(parents=True)
    (dst / "test.csv").write_text("id,scroll_id\n" + "".join(f"{i},{rows[i]['scroll_id']}\n" for i in ids))
    for i in ids:
        shutil.copy(data_dir / "train_images" / f"{i}.tif", dst / "test_images" / f"{i}.tif")
    return dst


@pytest.mark.slow
def test_oof_probabilities_equal_predict_save_probs(tmp_path, tiny_train_data):
    """``ensemble: logits`` with rot90 TTA: train used to drop ``ensemble`` for its out-of-fold
    probabilities (max |diff| 0.0005 on this tiny model), so tune saw other probabilities than predict."""
    from kaggle_utils.cli import main
    from kaggle_utils.config import from_dict
    from kaggle_utils.train import TrainConfig, train

    data = tiny_train_data
    cfg = from_dict(TrainConfig, json.loads(json.dumps(TINY)))
    train(cfg, data, tmp_path / "run", fold=0, device="cpu", progress=False, verbose=False)
    oof = sorted((tmp_path / "run" / "oof").glob("*.npz"))
    assert oof
    test = _test_set_of(data, [p.stem for p in oof], tmp_path / "test")
    rc = main(["predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data-dir", str(test),
               "--out", str(tmp_path / "s.zip"), "--device", "cpu", "--save-probs", str(tmp_path / "probs"), "--json"])
    assert rc == 0
    for npy in oof:
        a, b = read_probs(npy), read_probs(tmp_path / "probs" / npy.name)
        assert a.dtype == b.dtype == np.uint8
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------- fault fixtures

SHAPES = {"a1": (12, 14, 16), "b2": (10, 10, 10), "c3": (16, 12, 9)}


def _test_set(root: Path, shapes: dict = SHAPES, seed: int = 0) -> Path:
    from kaggle_utils.data import write_volume

    rng = np.random.default_rng(seed)
    (root / "test_images").mkdir(parents=True)
    (root / "test.csv").write_text("id,scroll_id\n" + "".join(f"{vid},1\n" for vid in shapes))
    for vid, shape in shapes.items():
        write_volume(root / "test_images" / f"{vid}.tif", rng.integers(0, 256, shape, dtype=np.uint8),
                     compression="zlib")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny real checkpoint: 32^3 windows, no TTA, threshold 0.5."""
    import torch

    from kaggle_utils.config import to_dict
    from kaggle_utils.models import ModelConfig, build_model, save_checkpoint

    cfg = ModelConfig(decoder_channels=[16, 8, 8, 4, 4])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    config = {"sampler": {"normalization": "zscore"}, "inference": {"patch_size": [32, 32, 32], "tta": "none"},
              "postprocess": {"threshold": 0.5}}
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "m.pt", model=model, model_config=to_dict(cfg),
                           config=config)


class _Opaque:
    """An object torch.load(weights_only=True) refuses to unpickle."""


def _bad_checkpoint(kind: str, good: Path, folder: Path) -> Path:
    import torch

    path = folder / f"{kind}.pt"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "state_dict":
        torch.save(torch.load(good, weights_only=True)["model"], path)
    elif kind == "other_arch":
        ckpt = torch.load(good, weights_only=True)
        ckpt["model_config"] = dict(ckpt["model_config"], arch="FPN")
        torch.save(ckpt, path)
    elif kind == "pickled_object":
        torch.save({"model": {}, "extra": _Opaque()}, path)
    return path


def _no_volume_read(monkeypatch):
    import kaggle_utils.predict as pred

    def boom(path):
        raise AssertionError(f"a volume was read: {path}")

    monkeypatch.setattr(pred, "read_volume", boom)


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from kaggle_utils.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "state_dict", "other_arch",
                                  "pickled_object"])
def test_bad_checkpoint_is_one_line_before_any_volume(kind, ckpt, tmp_path, capsys, monkeypatch):
    data = _test_set(tmp_path / "d")
    bad = _bad_checkpoint(kind, ckpt, tmp_path)
    _no_volume_read(monkeypatch)
    rc, out, err = _run_cli(capsys, "predict", "--checkpoint", bad, "--data-dir", data, "--out", tmp_path / "s.zip",
                            "--device", "cpu")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and str(bad) in lines[0], err
    assert "Traceback" not in out + err and "weights_only=False" not in err
    assert not (tmp_path / "s.zip").exists() and not (tmp_path / "s.zip.parts").exists()


@pytest.mark.parametrize("where", ["directory", "parent_is_file", "read_only"])
def test_bad_out_is_found_before_inference(where, ckpt, tmp_path, capsys, monkeypatch):
    import os

    data = _test_set(tmp_path / "d")
    if where == "directory":
        out = tmp_path / "outdir"
        out.mkdir()
    elif where == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "s.zip"
    else:
        if os.geteuid() == 0:  # root writes into read-only folders, not into /proc
            out = Path("/proc/self/ku-test-s.zip")
        else:
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o500)
            out = ro / "s.zip"
    _no_volume_read(monkeypatch)
    rc, _, err = _run_cli(capsys, "predict", "--checkpoint", ckpt, "--data-dir", data, "--out", out, "--device", "cpu")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and str(out) in lines[0] and "Traceback" not in err, err
    assert not list(tmp_path.rglob("*.tmp"))


def test_every_image_unreadable_exits_nonzero_each_failure_once(ckpt, tmp_path, capsys):
    import tifffile

    data = _test_set(tmp_path / "d")
    for vid, shape in SHAPES.items():  # float32 images: read_volume refuses them
        tifffile.imwrite(data / "test_images" / f"{vid}.tif", np.zeros(shape, np.float32))
    out = tmp_path / "s.zip"
    rc, stdout, err = _run_cli(capsys, "predict", "--checkpoint", ckpt, "--data-dir", data, "--out", out,
                               "--device", "cpu")
    assert rc == 1 and "Traceback" not in stdout + err and "validated" not in stdout + err
    for vid in SHAPES:
        assert (stdout + err).count(f"{vid}.tif") == 1, (vid, err)
        assert f"error: {vid}: " in err
    assert "no test volume could be predicted (3 failed)" in err
    assert not out.exists() and not (tmp_path / "s.zip.parts").exists()


def test_one_4d_image_submitted_empty_rest_kept(ckpt, tmp_path):
    import tifffile

    from kaggle_utils.predict import PredictWarning, predict_dataset
    from kaggle_utils.submission import validate_submission

    data = _test_set(tmp_path / "d")
    four_d = data / "test_images" / "b2.tif"
    tifffile.imwrite(four_d, np.zeros((10, 10, 10, 2), np.uint8))  # 10 pages of 10x10x2
    out = tmp_path / "s.zip"
    with pytest.warns(PredictWarning, match="b2: prediction failed, submitting an empty mask"):
        report = predict_dataset([ckpt], data, out, device="cpu", progress=False,
                                 postprocess_cfg={"threshold": 0.0})
    assert list(report.errors) == ["b2"] and str(four_d) in report.errors["b2"] and "4D" in report.errors["b2"]
    assert validate_submission(out, data) == []
    import io
    import zipfile

    from kaggle_utils.data import mask_shape

    with zipfile.ZipFile(out) as zf:
        empty = tifffile.imread(io.BytesIO(zf.read("b2.tif")))
        assert empty.shape == mask_shape(four_d) and empty.ndim == 3 and empty.sum() == 0  # the scorer's pages
        for vid in ("a1", "c3"):
            assert tifffile.imread(io.BytesIO(zf.read(f"{vid}.tif"))).all(), vid  # threshold 0: all foreground
    assert str(report).count(str(four_d)) == 1, str(report)


class _SigtermOnCall:
    """A model that sends this process SIGTERM on its ``n``-th forward call."""

    def __init__(self, n: int):
        import torch

        self.net = torch.nn.Conv3d(1, 1, 1)
        self.calls, self.n = 0, n

    def __call__(self, x):
        import os
        import signal

        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.net(x)

    def to(self, *a, **k):
        self.net.to(*a, **k)
        return self

    def eval(self):
        self.net.eval()
        return self

    def state_dict(self):
        return self.net.state_dict()


def test_sigterm_removes_temp_files_keeps_staged_masks(tmp_path, monkeypatch):
    import signal

    import torch

    import kaggle_utils.submission as sub
    from kaggle_utils.data import atomic_path
    from kaggle_utils.predict import Interrupted, predict_dataset, staging_dir

    data = _test_set(tmp_path / "d")
    out = tmp_path / "s.zip"
    model = torch.nn.Conv3d(1, 1, 1)
    kw = dict(data_dir=data, out_zip=out, device="cpu", progress=False, inference_cfg={"patch_size": [32, 32, 32]})

    # 1. SIGTERM while the zip is being written: the half zip's temp file goes, the staged masks stay
    def killed_zip(items, out_zip, **k):
        with atomic_path(out_zip) as tmp:
            tmp.write_bytes(b"PK half a zip")
            os.kill(os.getpid(), signal.SIGTERM)

    import os

    previous = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as mp, pytest.raises(Interrupted) as info:
        mp.setattr(sub, "write_submission", killed_zip)
        predict_dataset(models=[model], **kw)
    assert info.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is previous
    parts = staging_dir(out)
    assert sorted(p.name for p in parts.glob("*.tif")) == sorted(f"{v}.tif" for v in SHAPES)
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))

    # 2. a rerun reuses them all and writes the zip
    report = predict_dataset(models=[model], **kw)
    assert report.reused == list(SHAPES) and out.exists() and not parts.exists()


def test_sigterm_during_inference_keeps_finished_masks(tmp_path):
    import signal

    from kaggle_utils.predict import Interrupted, predict_dataset, staging_dir

    data = _test_set(tmp_path / "d")
    out = tmp_path / "s.zip"
    with pytest.raises(Interrupted):
        predict_dataset(models=[_SigtermOnCall(2)], data_dir=data, out_zip=out, device="cpu", progress=False,
                        inference_cfg={"patch_size": [32, 32, 32], "batch_size": 1})
    assert [p.name for p in staging_dir(out).glob("*.tif")] == ["a1.tif"]
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_device_cuda_without_gpu_is_one_line_and_device_is_printed(ckpt, tmp_path, capsys, monkeypatch):
    import torch

    data = _test_set(tmp_path / "d", {"a1": SHAPES["a1"]})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, out, err = _run_cli(capsys, "predict", "--checkpoint", ckpt, "--data-dir", data, "--out", tmp_path / "s.zip",
                            "--device", "cuda")
    assert rc == 2 and err.count("error:") == 1 and "no CUDA GPU" in err and "Traceback" not in out + err
    rc, out, err = _run_cli(capsys, "predict", "--checkpoint", ckpt, "--data-dir", data, "--out", tmp_path / "s.zip")
    assert rc == 0 and "predict: device cpu" in err and "validated" in out


def test_submission_names_the_new_home_of_predict_dataset_and_never_imports_predict():
    import subprocess
    import sys

    import kaggle_utils.submission as sub

    for name in ("predict_dataset", "PredictReport", "plan_tta", "staging_dir"):
        with pytest.raises(AttributeError, match=rf"^kaggle_utils.submission.{name} moved: use kaggle_utils.predict.{name}$"):
            getattr(sub, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sub.nope  # noqa: B018
    code = ("import sys, kaggle_utils.submission as s\n"
            "try:\n    s.predict_dataset\nexcept AttributeError:\n    pass\n"
            "print('kaggle_utils.predict' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_commands_never_show_a_traceback_on_fault_fixtures(ckpt, tmp_path, capsys):
    """predict, validate-submission and baseline on every fault fixture: exit status, no traceback."""
    import tifffile

    good = _test_set(tmp_path / "good", {"a1": SHAPES["a1"]})
    float_set = _test_set(tmp_path / "float", {"a1": SHAPES["a1"]})
    tifffile.imwrite(float_set / "test_images" / "a1.tif", np.zeros(SHAPES["a1"], np.float32))
    four_d = _test_set(tmp_path / "fourd", {"a1": SHAPES["a1"], "b2": SHAPES["b2"]})
    tifffile.imwrite(four_d / "test_images" / "b2.tif", np.zeros((10, 10, 10, 2), np.uint8))
    (tmp_path / "outdir").mkdir()
    bad_ckpts = [_bad_checkpoint(k, ckpt, tmp_path) for k in ("missing", "empty", "truncated", "random",
                                                              "state_dict", "other_arch")]
    runs = [["predict", "--checkpoint", c, "--data-dir", good, "--out", tmp_path / "p.zip", "--device", "cpu"]
            for c in bad_ckpts]
    runs += [["predict", "--checkpoint", ckpt, "--data-dir", d, "--out", o, "--device", "cpu"]
             for d, o in ((good, tmp_path / "outdir"), (float_set, tmp_path / "f.zip"), (four_d, tmp_path / "4.zip"))]
    runs += [["baseline", "--data-dir", d, "--out", o]
             for d, o in ((good, tmp_path / "outdir"), (float_set, tmp_path / "bf.zip"), (four_d, tmp_path / "b4.zip"))]
    runs += [["validate-submission", z, "--data-dir", good]
             for z in (tmp_path / "nothing.zip", bad_ckpts[3], tmp_path / "outdir")]
    runs += [["validate-submission", tmp_path / "4.zip", "--data-dir", four_d]]
    for argv in runs:
        rc, out, err = _run_cli(capsys, *argv)
        assert "Traceback" not in out + err, (argv, err)
        assert rc in (0, 1, 2), (argv, rc)
        if rc:
            assert err.strip() or out.strip(), argv
    assert _run_cli(capsys, "validate-submission", tmp_path / "4.zip", "--data-dir", four_d)[0] == 0


def test_predict_logs_and_reports_the_code_and_training_versions(ckpt, tmp_path, capsys):
    """Which code trained (the checkpoint's stamp, kept by export) and which predicted: in the log and report."""
    from kaggle_utils.models import export_checkpoint
    from kaggle_utils.version import version_stamp

    data = _test_set(tmp_path / "d")
    exported = export_checkpoint(ckpt, tmp_path / "model.pt")
    rc, out, err = _run_cli(capsys, "predict", "--checkpoint", exported, "--data-dir", data, "--out",
                            tmp_path / "s.zip", "--device", "cpu", "--json")
    assert rc == 0, err
    stamp = version_stamp()
    assert f"predict: kaggle_utils {stamp}, 1 model(s)" in err
    assert f"predict: {exported} trained with kaggle_utils {stamp}" in err  # ckpt was written by this code
    assert json.loads(out)["code_version"] == stamp
