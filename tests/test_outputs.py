"""Output locations (kaggle_utils.outputs): every writing command checks them before any work, in one line,
and a full disk during a checkpoint write says "disk full" and keeps the previous checkpoint."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kaggle_utils import outputs
from kaggle_utils.cli import main
from kaggle_utils.models import save_checkpoint
from kaggle_utils.outputs import DiskFullError, OutputError, check_output


# A tiny run (as tests/test_train.py's): 32^3 patches of 64^3 volumes, 2 batches of 2 per epoch, a thin decoder.
TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 4]},
    "sampler": {"patch_size": [32, 32, 32], "patches_per_epoch": 4, "surface_share": 0.7},
    "augment": {"p_affine": 0.0, "p_blur": 0.0},
    "optim": {"lr": 0.002, "warmup_epochs": 1},
    "train": {"epochs": 2, "batch_size": 2, "num_workers": 0, "seed": 3, "n_folds": 3},
    "validation": {"every": 1, "n_volumes": 1, "n_score": 0, "patch_size": [32, 32, 32], "batch_size": 2,
                   "overlap": 0.0},
    "inference": {"patch_size": [32, 32, 32]},
}


def _read_only(tmp_path: Path, name: str) -> Path:
    """A path nobody may create: under a chmod 500 folder, or under /proc for root (root ignores modes)."""
    if os.geteuid() == 0:
        return Path("/proc/self") / name
    ro = tmp_path / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o500)
    return ro / name


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def full_disk(monkeypatch):
    """Every file system reports 100 KiB free (less than outputs.MIN_FREE_BYTES)."""
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 100 * 1024)


# ------------------------------------------------------------------------------ the shared check


def test_check_output_creates_nothing_and_refuses_what_cannot_be_written(tmp_path, full_disk, monkeypatch):
    monkeypatch.undo()  # plenty of space first
    assert check_output(tmp_path / "a" / "b" / "x.pt") == tmp_path / "a" / "b" / "x.pt"
    assert check_output(tmp_path / "run" / "fold0", "dir") == tmp_path / "run" / "fold0"
    assert not list(tmp_path.iterdir())  # nothing created: missing folders are made when written; the probe is gone
    (tmp_path / "a").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"--out .*afile/x\.pt: .*afile is a file, not a folder"):
        check_output(tmp_path / "afile" / "x.pt")
    with pytest.raises(OutputError, match="is a folder, expected a file name"):
        check_output(tmp_path / "a", "file")
    with pytest.raises(OutputError, match="--plot"):
        check_output(_read_only(tmp_path, "t.png"), what="--plot")
    with pytest.raises(OutputError, match="cannot write in"):
        check_output(_read_only(tmp_path, "run") / "fold0", "dir")
    with pytest.raises(DiskFullError, match=r"^disk full: --out .*big\.pt needs about .*, only .* free on"):
        check_output(tmp_path / "big.pt", need_bytes=outputs.free_bytes(tmp_path) + (1 << 30))
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 100 * 1024)
    with pytest.raises(DiskFullError, match="needs about 1.0 MiB, only 100.0 KiB free"):
        check_output(tmp_path / "small.yaml")  # even a tiny output needs MIN_FREE_BYTES


# ------------------------------------------------------------------------------ a full disk while writing


def _fake_save_that_fills_the_disk(kind: str):
    def fake_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04partial")  # a half-written temp file
        if kind == "torch":  # what torch's zip writer says when the disk fills up mid-write
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4054")
        raise OSError(errno.ENOSPC, "No space left on device")
    return fake_save


@pytest.mark.parametrize("kind", ["torch", "oserror"])
def test_disk_full_during_torch_save_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, kind):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model={"w": torch.ones(3)}, epoch=1)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _fake_save_that_fills_the_disk(kind))
    with pytest.raises(DiskFullError) as exc:
        save_checkpoint(path, model={"w": torch.zeros(3)}, epoch=2)
    msg = str(exc.value)
    assert msg.startswith(f"disk full: could not write {path}") and "unexpected pos" not in msg and "\n" not in msg
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp left
    assert torch.load(path, weights_only=True)["epoch"] == 1


def _tiny_train_yaml(tmp_path: Path, epochs: int = 2) -> Path:
    data = json.loads(json.dumps(TINY))
    data["train"]["epochs"] = epochs
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.mark.slow  # two tiny epochs (~10 s on 2 cores)
def test_train_disk_full_at_the_second_checkpoint_is_one_line_and_keeps_epoch_one(tiny_train_data, tmp_path,
                                                                                 monkeypatch, capsys):
    real_save, calls = torch.save, []

    def save_then_fill(obj, f, *args, **kwargs):
        calls.append(obj.get("epoch") if isinstance(obj, dict) else None)
        if len(calls) > 2:  # epoch 1: last.pt and best.pt written; then the disk is full
            return _fake_save_that_fills_the_disk("torch")(obj, f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fill)
    run = tmp_path / "run"
    rc = main(["train", "--config", str(_tiny_train_yaml(tmp_path)), "--fold", "0", "--data-dir",
               str(tiny_train_data), "--out", str(run), "--no-progress"])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: disk full: could not write {run}/last.pt"), line
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # the previous checkpoint, intact


# ------------------------------------------------------------------------------ every writing command


def _no_work(monkeypatch):
    """Make the first step of real work of each command fail loudly: the output check must come first."""
    import kaggle_utils.diagnostics as diagnostics
    import kaggle_utils.models as models
    import kaggle_utils.prepare as prepare
    import kaggle_utils.train.setup as train_setup
    import kaggle_utils.tune as tune

    def boom(*args, **kwargs):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr(train_setup, "load_index", boom)
    monkeypatch.setattr(models, "_torch_load", boom)
    monkeypatch.setattr(diagnostics, "load_predictions", boom)
    monkeypatch.setattr(tune, "load_probs", boom)
    monkeypatch.setattr(prepare, "prepare", boom)


def _argv(command: str, out: Path, tmp_path: Path, data: Path) -> list[str]:
    ckpt = tmp_path / "in.pt"
    return {
        "train": ["train", "--config", str(_tiny_train_yaml(tmp_path)), "--data-dir", str(data), "--out", str(out)],
        "export": ["export", str(ckpt), "--out", str(out)],
        "diagnose": ["diagnose", str(tmp_path / "p.zip"), "--data-dir", str(data), "--out", str(out)],
        "tune": ["tune", "--probs", str(tmp_path / "probs"), "--data-dir", str(data), "--out", str(out)],
        "prepare": ["prepare", "--data-dir", str(data), "--out", str(out)],
        "tune --plot": ["tune", "--probs", str(tmp_path / "probs"), "--data-dir", str(data), "--out",
                        str(tmp_path / "ok.yaml"), "--plot", str(out)],
    }[command]


COMMANDS = ["train", "export", "diagnose", "tune", "tune --plot", "prepare"]


@pytest.mark.parametrize("where", ["read_only", "parent_is_file", "full"])
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_out_is_one_line_before_any_work(command, where, tiny_train_data, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    name = "run" if command in ("train", "prepare") else "out.file"
    if where == "read_only":
        out = _read_only(tmp_path, name)
    elif where == "parent_is_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / name
    else:
        out = tmp_path / "sub" / name
        monkeypatch.setattr(outputs, "free_bytes", lambda folder: 100 * 1024)
    rc = main(_argv(command, out, tmp_path, tiny_train_data))
    line = _one_error(capsys.readouterr().err)
    named = str(out) if (command, where) != ("tune --plot", "full") else str(tmp_path / "ok.yaml")  # --out first
    assert rc == 2 and named in line, line
    assert ("disk full" in line) == (where == "full"), line


def test_train_refuses_a_run_folder_without_room_for_its_checkpoints(tiny_train_data, tmp_path, monkeypatch,
                                                                   capsys):
    from kaggle_utils.train import checkpoint_bytes, load_train_config

    cfg_path = _tiny_train_yaml(tmp_path)
    need = 3 * checkpoint_bytes(load_train_config(cfg_path))
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: need - 1)
    _no_work(monkeypatch)
    rc = main(["train", "--config", str(cfg_path), "--data-dir", str(tiny_train_data), "--out", str(tmp_path / "r")])
    line = _one_error(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"error: disk full: --out {tmp_path / 'r'} needs about"), line


def test_checkpoint_estimate_matches_a_written_checkpoint(tmp_path):
    """The estimate behind train's free-space check, against a real AdamW checkpoint with EMA after one step."""
    from kaggle_utils.config import from_dict
    from kaggle_utils.models import build_model
    from kaggle_utils.train import TrainConfig, checkpoint_bytes
    data = json.loads(json.dumps(TINY))
    data["train"]["ema"] = True
    cfg = from_dict(TrainConfig, data)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 1, 32, 32, 32)).mean().backward()
    opt.step()
    ema = {k: v.clone() for k, v in model.state_dict().items()}  # a copy (shared tensors are saved once)
    save_checkpoint(tmp_path / "c.pt", model=model, ema=ema, optimizer=opt.state_dict())
    real = (tmp_path / "c.pt").stat().st_size
    assert 0.9 * real < checkpoint_bytes(cfg) < 1.1 * real


def test_predict_full_disk_is_one_line_before_any_volume(tiny_train_data, tmp_path, monkeypatch, capsys):
    import kaggle_utils.predict as pred

    monkeypatch.setattr(pred, "load_models", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 0)
    out = tmp_path / "s.zip"
    rc = main(["predict", "--checkpoint", str(tmp_path / "m.pt"), "--data-dir", str(tiny_train_data), "--out",
               str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: disk full: --out {out}"), err
    assert not np.any([p.suffix == ".tmp" for p in tmp_path.rglob("*")])
