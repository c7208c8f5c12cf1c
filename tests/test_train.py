"""Tests for kaggle_utils.train: one epoch via the CLI, exact resume, time limit, collapse stop,
bad configs, shipped configs, label modes, the LR schedule and a 2-process gloo run (slow)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kaggle_utils.config import ConfigError, to_dict
from kaggle_utils.train import (
    OptimConfig,
    TrainConfig,
    WarmupSchedule,
    apply_label_mode,
    load_train_config,
    train,
)

warnings.filterwarnings("ignore", category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]

# A tiny run: 32^3 patches of 64^3 synthetic volumes, 2 batches of 2 per epoch, a thin decoder.
TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 4]},
    "loss": {"name": "default"},
    "sampler": {"patch_size": [32, 32, 32], "patches_per_epoch": 4, "surface_share": 0.7},
    "augment": {"p_affine": 0.0, "p_blur": 0.0},
    "optim": {"lr": 0.002, "warmup_epochs": 1},
    "train": {"epochs": 2, "batch_size": 2, "num_workers": 0, "seed": 3, "n_folds": 3},
    "validation": {"every": 1, "n_volumes": 1, "n_score": 0, "patch_size": [32, 32, 32], "batch_size": 2,
                   "overlap": 0.0},
    "inference": {"patch_size": [32, 32, 32]},
    "postprocess": {"threshold": 0.5},
}


def tiny_cfg(**sections) -> TrainConfig:
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        data[key].update(value)
    from kaggle_utils.config import from_dict

    return from_dict(TrainConfig, data)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from kaggle_utils.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("syn"), n_train=3, n_test=1, size=64, n_scrolls=3, seed=0)


def test_one_epoch_via_cli_logs_every_loss_part(data_dir, tmp_path):
    from kaggle_utils.cli import main

    cfg_path = tmp_path / "tiny.yaml"
    data = json.loads(json.dumps(TINY))
    data["validation"]["n_score"] = 1
    cfg_path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    rc = main(["train", "--config", str(cfg_path), "--fold", "0", "--data-dir", str(data_dir), "--out", str(run),
               "--epochs", "1", "--no-progress"])
    assert rc == 0
    log = (run / "train.log").read_text()
    line = [ln for ln in log.splitlines() if "epoch 1/1" in ln][0]
    for part in ("dice", "bce", "cldice", "lr", "val dice", "score", "fg"):
        assert part in line, (part, line)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    for key in ("train_loss", "train_dice", "train_bce", "train_cldice", "lr", "val_dice", "val_score", "val_fg_pct"):
        assert rows[0][key] is not None, key
    assert 0.0 <= rows[0]["val_score"] <= 1.0
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["train"]["n_folds"] == 3 and (run / "best.pt").is_file()
    # out-of-fold probabilities for the validation id(s)
    sidecars = sorted((run / "oof").glob("*.json"))
    assert sidecars
    meta = json.loads(sidecars[0].read_text())
    prob = np.load(sidecars[0].with_suffix(".npy"))
    assert meta["fold"] == 0 and meta["scroll_id"] and prob.dtype == np.float16 and list(prob.shape) == meta["shape"]
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_after_kill_equals_uninterrupted(data_dir, tmp_path):
    cfg = tiny_cfg(validation={"write_oof": False})
    full = train(cfg, data_dir, tmp_path / "full", fold=1, progress=False)
    assert full.epochs_completed == 2

    class Killed(Exception):
        pass

    def kill_after_first(row):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, data_dir, tmp_path / "resumed", fold=1, progress=False, on_epoch_end=kill_after_first)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = train(cfg, data_dir, tmp_path / "resumed", fold=1, resume=True, progress=False)
    assert resumed.epochs_completed == 2 and len(resumed.history) == 2
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "resumed" / "last.pt")
    assert a.keys() == b.keys()
    max_diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert max_diff <= 1e-6
    assert full.history[1]["train_loss"] == pytest.approx(resumed.history[1]["train_loss"], abs=1e-6)
    # the log file holds both sessions, metrics.jsonl exactly one row per epoch
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2
    vv = [json.loads(x)["epoch"] for x in (tmp_path / "resumed" / "val_volumes.jsonl").read_text().splitlines()]
    assert vv == [1, 2]


def test_time_limit_stops_cleanly(data_dir, tmp_path):
    res = train(tiny_cfg(), data_dir, tmp_path / "run", fold=0, time_limit=0.0, progress=False)
    assert res.stopped == "time_limit" and res.epochs_completed == 0
    assert "time limit" in (tmp_path / "run" / "train.log").read_text()


def test_collapse_guard_stops_run(data_dir, tmp_path):
    # threshold 1.0: nothing is ever predicted, so the guard must report an "empty" collapse
    cfg = tiny_cfg(validation={"on_collapse": "stop", "stop_kinds": ["empty"], "write_oof": False},
                   postprocess={"threshold": 1.0}, train={"epochs": 3})
    res = train(cfg, data_dir, tmp_path / "run", fold=0, progress=False)
    assert res.stopped == "collapse" and res.epochs_completed == 1
    assert res.history[0]["collapse"] == "empty"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "collapse guard" in log and "on_collapse is 'stop'" in log


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("train: {epochs: 1, lerning_rate: 3}", "train.lerning_rate"),
        ("optim: {lr: fast}", "optim.lr"),
        ("optimizer: {lr: 0.1}", "optimizer"),
        ("train: {label_mode: everything}", "train.label_mode"),
        ("sampler: {patch_size: [48, 64, 64]}", "sampler.patch_size"),
        ("model: {encoder: resnet1000}", "model.encoder"),
        ("loss: {name: seed-v3}", "loss"),
        ("validation: {on_collapse: panic}", "validation.on_collapse"),
        ("loss: {ignore_label: null}", "loss.ignore_label"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as exc:
        cfg = load_train_config(path)
        from kaggle_utils.losses import build_loss

        build_loss(cfg.loss)
    assert key in str(exc.value)
    if "lerning" in key or "optimizer" in key:
        assert isinstance(exc.value, ConfigError) and str(path) in str(exc.value)


def test_shipped_configs_load_and_are_packaged():
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert {"smoke-cpu.yaml", "kaggle-t4.yaml", "seed-v1.yaml", "seed-v2.yaml"} <= set(names)
    for name in names:
        cfg = load_train_config(REPO / "configs" / name)
        assert to_dict(load_train_config(name)) == to_dict(cfg)  # the packaged copy is identical
        assert (REPO / "kaggle_utils" / "configs" / name).read_text() == (REPO / "configs" / name).read_text()
    assert load_train_config("seed-v2").train.label_mode == "foreground"
    assert load_train_config("seed-v2").loss.name == "seed-v2"
    assert load_train_config("kaggle-t4").train.amp == "fp16"


def test_apply_label_mode_known_answers():
    lbl = torch.tensor([0, 1, 2, 1, 0], dtype=torch.uint8)
    assert apply_label_mode(lbl, "ignore").tolist() == [0, 1, 2, 1, 0]
    assert apply_label_mode(lbl, "foreground").tolist() == [0, 1, 1, 1, 0]
    assert apply_label_mode(lbl, "background").tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="label_mode"):
        apply_label_mode(lbl, "nope")


def test_schedule_warmup_cosine_and_plateau():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = WarmupSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=1, schedule="cosine", min_lr_ratio=0.0), 10, 3)
    assert s.lr == pytest.approx(0.01)
    assert s.factor(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(20) == pytest.approx(0.5)
    assert s.factor(30) == pytest.approx(0.0, abs=1e-12)
    state = s.state_dict()
    s2 = WarmupSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=1, schedule="cosine", min_lr_ratio=0.0), 10, 3)
    for _ in range(7):
        s.step()
    s2.load_state_dict(s.state_dict())
    assert s2.lr == s.lr and state["step_count"] == 0
    pl = WarmupSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=0, schedule="plateau", plateau_patience=2,
                                         plateau_factor=0.5), 10, 3)
    for score in (0.5, 0.4, 0.4):
        pl.observe(score)
    assert pl.lr == pytest.approx(0.5)


DDP_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from kaggle_utils.config import from_dict
from kaggle_utils.train import TrainConfig, train
cfg = from_dict(TrainConfig, json.loads(sys.argv[1]))
import os
rank = os.environ["RANK"]
res = train(cfg, sys.argv[2], sys.argv[3], fold=0, device="cpu", progress=False)
with open(sys.argv[4] + f".rank{rank}", "w") as fh:  # one file per rank: stdout of two ranks interleaves
    fh.write(f"RESULT {torch.distributed.is_initialized()} {res.epochs_completed} {res.stopped}")
"""


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_one_epoch(data_dir, tmp_path):
    data = json.loads(json.dumps(TINY))
    data["train"]["epochs"] = 1
    data["validation"]["write_oof"] = False
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), json.dumps(data), str(data_dir), str(tmp_path / "run"), str(tmp_path / "result")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"result.rank{rank}").read_text() == "RESULT False 1 completed", out.stdout[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("epoch 1/1") == 1 and "2 rank(s)" in log  # rank 0 logs, once
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1


def test_train_result_summary_line(tmp_path):
    from kaggle_utils.train import TrainResult

    r = TrainResult(tmp_path, fold=2, epochs_completed=7, best_epoch=6, best_score=0.61234, stopped="early_stopping")
    assert str(r) == f"fold 2: early_stopping after 7 epoch(s), best 0.6123 at epoch 6; {tmp_path}"
