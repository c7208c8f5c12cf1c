"""``export``: the small inference file of a training checkpoint (models.export_checkpoint + CLI)."""

from __future__ import annotations

import argparse
import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from kaggle_utils.cli import main
from kaggle_utils.config import to_dict
from kaggle_utils.data import write_volume
from kaggle_utils.probs import read_probs
from kaggle_utils.models import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    CheckpointError,
    ModelConfig,
    build_model,
    export_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

warnings.filterwarnings("ignore", category=FutureWarning)

TRAINING_ONLY = {"optimizer", "scaler", "scheduler", "rng", "ema_state", "history", "metrics", "epoch",
                 "best_score", "best_epoch", "bad_validations"}
EXPORTED_KEYS = {"format", "format_version", "model", "model_config", "config", "fold", "weights", "dtype",
                 "kaggle_utils_version", "trained_with"}  # which code exported it, which trained it
# float16 weights vs float32 on a 32x32x64 input of the tiny U-Net below (logits span about +-18):
# measured max |dp| 0.0098, mean |dp| 9e-5, 0.018 % of voxels flip at threshold 0.5
FP16_MAX_ATOL, FP16_MEAN_ATOL, FP16_MAX_FLIPS = 0.02, 5e-4, 1e-3


def train_like_checkpoint(path: Path, mcfg: ModelConfig, config: dict, ema: bool = True, seed: int = 0) -> Path:
    """A checkpoint with everything train() stores: model, EMA, optimizer (with state), scaler,
    scheduler, RNG, metrics and history; the EMA weights differ from the model's."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(seed)
    model = build_model(mcfg)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True) if ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(torch.randn(2, 1, 32, 32, 32)).square().mean()
    loss.backward()
    optimizer.step()  # optimizer state (exp_avg, exp_avg_sq) as train has it
    if averaged is not None:
        averaged.update_parameters(model)
        averaged.update_parameters(model)
    optimizer.step()  # the model moves on: EMA != model
    history = [{"epoch": 1, "loss": 0.5}]
    return save_checkpoint(
        path, model=model.state_dict(), ema=averaged.module.state_dict() if averaged is not None else None,
        ema_state=averaged.state_dict() if averaged is not None else None, optimizer=optimizer.state_dict(),
        scaler=torch.amp.GradScaler("cpu", enabled=False).state_dict(), scheduler={"step": 2, "plateau_scale": 1.0},
        rng={"torch": torch.get_rng_state(), "numpy": [1, 2, 3]}, epoch=1, fold=1, config=config,
        model_config=to_dict(mcfg), metrics=history[-1], history=history, best_score=0.4, best_epoch=1,
        bad_validations=0,
    )


MCFG = ModelConfig(decoder_channels=[16, 8, 8, 4, 4])
CONFIG = {
    "model": to_dict(MCFG), "loss": {"name": "default"}, "optim": {"lr": 0.01},
    "sampler": {"normalization": "fixed", "patch_size": [32, 32, 32]}, "train": {"epochs": 3, "fold": 1},
    "inference": {"patch_size": [32, 32, 32], "overlap": 0.25, "batch_size": 2, "tta": "none"},
    "postprocess": {"threshold": 0.5},
}


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory) -> Path:
    return train_like_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", MCFG, CONFIG)


def _raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow  # full_ckpt writes and reads a ~200 MB training checkpoint (about 25 s on 2 cores)
def test_export_keeps_only_what_inference_needs(tmp_path, full_ckpt):
    out = export_checkpoint(full_ckpt, tmp_path / "model.pt")
    raw, full = _raw(out), _raw(full_ckpt)
    assert set(raw) == EXPORTED_KEYS and not TRAINING_ONLY & set(raw)
    assert raw["format"] == EXPORT_FORMAT and raw["format_version"] == EXPORT_VERSION
    assert raw["weights"] == "ema" and raw["dtype"] == "float32" and raw["fold"] == 1
    assert set(raw["config"]) == {"model", "inference", "postprocess", "sampler"}
    assert raw["config"]["sampler"] == {"normalization": "fixed"}
    assert raw["config"]["inference"] == CONFIG["inference"] and raw["config"]["postprocess"] == CONFIG["postprocess"]
    for k, v in full["ema"].items():  # the EMA weights, bit for bit
        assert torch.equal(raw["model"][k], v), k
    assert any(not torch.equal(full["ema"][k], full["model"][k]) for k in full["model"])
    assert out.stat().st_size < full_ckpt.stat().st_size / 2


@pytest.mark.slow  # full_ckpt writes and reads a ~200 MB training checkpoint (about 25 s on 2 cores)
def test_export_round_trip_same_predictions(tmp_path, full_ckpt):
    fp32 = export_checkpoint(full_ckpt, tmp_path / "model.pt")
    fp16 = export_checkpoint(full_ckpt, tmp_path / "model16.pt", fp16=True)
    raw16 = _raw(fp16)
    assert raw16["dtype"] == "float16"
    assert all(v.dtype in (torch.float16, torch.int64) for v in raw16["model"].values())
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    x = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(3))
    ref_model, ref_cfg, _ = load_checkpoint(full_ckpt)
    with torch.no_grad():
        ref = torch.sigmoid(ref_model(x))
        m32, cfg32, _ = load_checkpoint(fp32)
        assert torch.equal(torch.sigmoid(m32(x)), ref)
        m16, _, _ = load_checkpoint(fp16)
        assert all(p.dtype == torch.float32 for p in m16.parameters())
        p16 = torch.sigmoid(m16(x))
    err = (p16 - ref).abs()
    assert 0 < float(err.max()) < FP16_MAX_ATOL and float(err.mean()) < FP16_MEAN_ATOL
    assert float(((p16 > 0.5) != (ref > 0.5)).float().mean()) < FP16_MAX_FLIPS
    for section in ("inference", "postprocess", "sampler"):
        assert cfg32[section].items() <= ref_cfg[section].items()


def _test_set(root: Path) -> Path:
    (root / "test_images").mkdir(parents=True)
    (root / "test.csv").write_text("id,scroll_id\nv1,5\n")
    rng = np.random.default_rng(0)
    write_volume(root / "test_images" / "v1.tif", rng.integers(0, 255, (20, 33, 40), dtype=np.uint8),
                 compression="zlib")
    return root


@pytest.mark.slow
def test_predict_same_submission_from_full_and_exported(tmp_path, full_ckpt):
    from kaggle_utils.predict import predict_dataset

    data = _test_set(tmp_path / "data")
    exported = export_checkpoint(full_ckpt, tmp_path / "model.pt")
    masks = []
    for i, ckpt in enumerate((full_ckpt, exported)):
        out = tmp_path / f"s{i}.zip"
        report = predict_dataset([ckpt], data, out, device="cpu", progress=False, save_probs=tmp_path / f"p{i}")
        assert report.errors == {}
        with zipfile.ZipFile(out) as zf:
            masks.append(tifffile.imread(io.BytesIO(zf.read("v1.tif"))))
        assert (tmp_path / f"p{i}" / "v1.npz").is_file()
    np.testing.assert_array_equal(masks[0], masks[1])
    np.testing.assert_array_equal(read_probs(tmp_path / "p0" / "v1.npz"), read_probs(tmp_path / "p1" / "v1.npz"))
    assert 0 < masks[0].mean() < 1


@pytest.mark.slow  # writes and exports its own training checkpoint (7-22 s on 2 shared cores)
def test_export_without_ema_uses_model_weights(tmp_path):
    full = train_like_checkpoint(tmp_path / "last.pt", MCFG, {"model": to_dict(MCFG)}, ema=False)
    out = export_checkpoint(full, tmp_path / "m.pt", fp16=True)
    raw = _raw(out)
    assert raw["weights"] == "model" and raw["config"] == {"model": to_dict(MCFG), "sampler": {"normalization": "zscore"}}
    for k, v in _raw(full)["model"].items():
        assert torch.equal(raw["model"][k], v.half() if v.is_floating_point() else v), k


@pytest.mark.slow  # full_ckpt writes and reads a ~200 MB training checkpoint (about 25 s on 2 cores)
def test_cli_export(tmp_path, full_ckpt, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(full_ckpt), "--out", str(out), "--fp16"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out} (") and "float16 weights" in line and str(full_ckpt) in line
    assert _raw(out)["dtype"] == "float16"


@pytest.mark.parametrize("case, message", [
    ("missing", "checkpoint not found"),
    ("garbage", "cannot load checkpoint, truncated or not a torch file"),
    ("foreign", "not a kaggle_utils checkpoint"),
    ("no_config", "checkpoint has no model_config"),
    ("same_file", "refusing to overwrite the source checkpoint"),
    ("pickled", "holds pickled Python objects"),
    ("numpy", "a numpy .npy file, not a torch checkpoint"),
    ("empty", "empty file"),
    ("newer", "this kaggle_utils reads up to"),
])
def test_cli_export_errors_are_one_line(tmp_path, capsys, case, message):
    src = tmp_path / "in.pt"
    if case == "garbage":
        src.write_bytes(b"\x00not a torch file" * 5)
    elif case == "foreign":
        torch.save({"foo": 1}, src)
    elif case == "pickled":  # a whole pickled object, as torch.save(model) writes
        torch.save({"model": {}, "args": argparse.Namespace(lr=1e-3)}, src)
    elif case == "numpy":
        np.save(tmp_path / "a.npy", np.zeros(3))
        (tmp_path / "a.npy").rename(src)
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "no_config":
        torch.save({"model": {"w": torch.zeros(2)}}, src)
    elif case in ("same_file", "newer"):
        torch.save({"model": {}, "model_config": to_dict(MCFG), "format": EXPORT_FORMAT,
                    "format_version": EXPORT_VERSION + (case == "newer")}, src)
    out = src if case == "same_file" else tmp_path / "out.pt"
    assert main(["export", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}: ") and message in err and err.count("\n") == 1
    assert "weights_only" not in err and "False" not in err  # never torch's advice to unpickle anything
    if case == "newer":
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(src)
    assert case == "same_file" or not out.exists()
