"""Tests for kaggle_utils.train: one epoch via the CLI, exact resume (also from a read-only earlier
session), time limit, collapse stop, log lines on stdout, bad configs, shipped configs, label modes,
the LR schedule and 2-process gloo runs (slow: a script, and the CLI launched by train_torchrun)."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kaggle_utils.config import ConfigError, to_dict
from kaggle_utils.probs import read_probs
from kaggle_utils.train import (
    OptimConfig,
    TrainConfig,
    TrainResult,
    apply_label_mode,
    load_train_config,
    stage_resume,
    train,
    train_torchrun,
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
def data_dir(tiny_train_data):
    return tiny_train_data  # conftest: 3 train volumes of 64^3 from 3 scrolls, shared with test_predict


@pytest.mark.slow
def test_one_epoch_via_cli_logs_every_loss_part(data_dir, tmp_path, capsys):
    from kaggle_utils.cli import main

    cfg_path = tmp_path / "tiny.yaml"
    data = json.loads(json.dumps(TINY))
    data["validation"]["n_score"] = 1
    cfg_path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    rc = main(["train", "--config", str(cfg_path), "--fold", "0", "--data-dir", str(data_dir), "--out", str(run),
               "--epochs", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    # the log lines on stdout too, each once: device, epoch line, end of the fold, the summary
    assert out.count("epoch 1/1 loss") == 1 and "fold 0: device cpu" in out, out
    assert out.count("fold 0 finished (completed)") == 1 and out.count("fold 0: completed after 1 epoch(s)") == 1
    assert TrainResult.load(run).epochs_completed == 1
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
    prob = read_probs(sidecars[0].with_suffix(".npz"))  # the compact default, validation.oof_format: uint8
    assert meta["fold"] == 0 and meta["scroll_id"] and prob.dtype == np.uint8 and list(prob.shape) == meta["shape"]
    assert meta["dtype"] == "uint8" and meta["scale"] == 255 and not list((run / "oof").glob("*.npy"))


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def fold1_runs(data_dir, tmp_path_factory):
    """``(cfg, full result, full run dir, killed run dir)``: fold 1 trained for 2 epochs without a stop,
    and the same run killed after epoch 1 (its folder as the kill left it)."""
    root = tmp_path_factory.mktemp("fold1")
    cfg = tiny_cfg(validation={"write_oof": False})
    full = train(cfg, data_dir, root / "full", fold=1, progress=False)
    assert full.epochs_completed == 2

    class Killed(Exception):
        pass

    def kill_after_first(row):
        if row["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(cfg, data_dir, root / "killed", fold=1, progress=False, on_epoch_end=kill_after_first)
    assert torch.load(root / "killed" / "last.pt", weights_only=True)["epoch"] == 1
    return cfg, full, root / "full", root / "killed"


def _max_weight_diff(path_a, path_b) -> float:
    a, b = _weights(path_a), _weights(path_b)
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(data_dir, tmp_path, fold1_runs):
    cfg, full, full_dir, killed = fold1_runs
    shutil.copytree(killed, tmp_path / "resumed")
    resumed = train(cfg, data_dir, tmp_path / "resumed", fold=1, resume=True, progress=False)
    assert resumed.epochs_completed == 2 and len(resumed.history) == 2
    a, b = _weights(full_dir / "last.pt"), _weights(tmp_path / "resumed" / "last.pt")
    assert a.keys() == b.keys()
    max_diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert max_diff <= 1e-6
    assert full.history[1]["train_loss"] == pytest.approx(resumed.history[1]["train_loss"], abs=1e-6)
    # the log file holds both sessions, metrics.jsonl exactly one row per epoch
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2
    vv = [json.loads(x)["epoch"] for x in (tmp_path / "resumed" / "val_volumes.jsonl").read_text().splitlines()]
    assert vv == [1, 2]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _set_tree_mode(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        w = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        p.chmod(mode | stat.S_IWUSR if writable else mode & ~w)


@pytest.mark.slow
def test_stage_resume_from_read_only_input_continues_exactly(data_dir, tmp_path, fold1_runs):
    cfg, full, full_dir, killed = fold1_runs
    # the earlier session's output attached read-only, beside an older copy (epoch 0) and another fold
    inputs = tmp_path / "input"
    shutil.copytree(killed, inputs / "session-2" / "runs" / "train" / "fold1")
    older = inputs / "session-1" / "runs" / "fold1"
    older.mkdir(parents=True)
    ckpt = torch.load(killed / "last.pt", weights_only=True)
    torch.save({**ckpt, "epoch": 0}, older / "last.pt")
    (inputs / "other" / "fold10").mkdir(parents=True)
    torch.save({"epoch": 9}, inputs / "other" / "fold10" / "last.pt")
    before = _tree_digest(inputs)
    _set_tree_mode(inputs, writable=False)
    try:
        out = tmp_path / "working" / "runs"
        staged = stage_resume(inputs, out, [0, 1])
        assert staged == [out / "fold1"]  # fold 0 has no checkpoint: it will start fresh
        assert _tree_digest(out / "fold1") == _tree_digest(killed)  # the newest session's folder, whole
        assert all(p.stat().st_mode & stat.S_IWUSR for p in (out / "fold1").rglob("*"))  # writable copies
        resumed = train(cfg, data_dir, out / "fold1", fold=1, resume=True, progress=False)
        assert resumed.epochs_completed == 2
        assert _max_weight_diff(full_dir / "last.pt", out / "fold1" / "last.pt") <= 1e-6
        assert _tree_digest(inputs) == before  # the input was only read
        # staging again keeps the further trained copy; a run folder passed directly works too
        assert stage_resume(inputs, out, [1]) == [out / "fold1"]
        assert torch.load(out / "fold1" / "last.pt", weights_only=True)["epoch"] == 2
        assert stage_resume(killed, tmp_path / "direct", [1]) == [tmp_path / "direct" / "fold1"]
    finally:
        _set_tree_mode(inputs, writable=True)
    from kaggle_utils.data import DataError

    with pytest.raises(DataError, match="no such folder"):
        stage_resume(tmp_path / "missing", out, [0])
    with pytest.raises(DataError, match="name its fold"):
        stage_resume(killed, out, [0, 1])


def test_time_limit_stops_cleanly(data_dir, tmp_path, capsys, monkeypatch):
    import kaggle_utils.train.setup as setup_mod

    calls = []
    monkeypatch.setattr(setup_mod, "warn_slow_conv3d_amp", lambda dev, amp: calls.append((str(dev), amp)))
    res = train(tiny_cfg(), data_dir, tmp_path / "run", fold=0, time_limit=0.0, progress=False)
    assert res.stopped == "time_limit" and res.epochs_completed == 0
    assert "time limit" in (tmp_path / "run" / "train.log").read_text()
    out = capsys.readouterr().out  # a notebook sees the device and the stop reason
    assert out.startswith("fold 0: device cpu\n") and "time limit" in out and "finished (time_limit)" in out
    assert calls == [("cpu", False)]  # the torch 2.9 AMP check runs where the model meets its device
    assert TrainResult.load(tmp_path / "run").stopped == "time_limit"
    res = train(tiny_cfg(), data_dir, tmp_path / "quiet", fold=0, time_limit=0.0, progress=False, verbose=False)
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_collapse_guard_stops_run(data_dir, tmp_path, capsys):
    # threshold 1.0: nothing is ever predicted, so the guard must report an "empty" collapse
    cfg = tiny_cfg(validation={"on_collapse": "stop", "stop_kinds": ["empty"], "write_oof": False,
                               "collapse_stop_after": 1},
                   postprocess={"threshold": 1.0}, train={"epochs": 3})
    res = train(cfg, data_dir, tmp_path / "run", fold=0, progress=False)
    assert res.stopped == "collapse" and res.epochs_completed == 1
    assert res.history[0]["collapse"] == "empty"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "collapse guard" in log and "on_collapse is 'stop'" in log
    out = capsys.readouterr().out  # called as a function (the notebook), the same lines reach stdout, once
    assert out.count("epoch 1/3 loss") == 1 and "[empty]" in out and out.count("on_collapse is 'stop'") == 1


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
    names = sorted(p.name for p in (REPO / "kaggle_utils" / "configs").glob("*.yaml"))
    assert {"smoke-cpu.yaml", "kaggle-t4.yaml", "seed-v1.yaml", "seed-v2.yaml", "demo-cpu.yaml"} <= set(names)
    assert not (REPO / "configs").exists()  # one copy of the shipped configs: the package's
    for name in names:
        cfg = load_train_config(REPO / "kaggle_utils" / "configs" / name)
        assert to_dict(load_train_config(name)) == to_dict(cfg)  # by name, with or without .yaml
        assert to_dict(load_train_config(name.removesuffix(".yaml"))) == to_dict(cfg)
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
    from kaggle_utils.train import LRSchedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = LRSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=1, schedule="cosine", min_lr_ratio=0.0), 10, 3)
    assert s.lr == pytest.approx(0.01)
    assert s.factor(5) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(20) == pytest.approx(0.5)
    assert s.factor(30) == pytest.approx(0.0, abs=1e-12)
    state = s.state_dict()
    s2 = LRSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=1, schedule="cosine", min_lr_ratio=0.0), 10, 3)
    for _ in range(7):
        s.step()
    s2.load_state_dict(s.state_dict())
    assert s2.lr == s.lr and state["step_count"] == 0
    pl = LRSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=0, schedule="plateau", plateau_patience=2,
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


@pytest.mark.slow
def test_train_torchrun_runs_the_cli_on_two_gloo_processes(data_dir, tmp_path, capsys):
    # the notebook's GPUS=2 path: python -m torch.distributed.run --nproc_per_node 2 -m kaggle_utils train ...
    data = json.loads(json.dumps(TINY))
    data["validation"]["write_oof"] = False
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    results = train_torchrun(2, cfg_path, data_dir, tmp_path / "runs", folds=[0], epochs=1, device="cpu",
                             env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m kaggle_utils train" in out
    assert [(r.fold, r.epochs_completed, r.stopped) for r in results] == [(0, 1, "completed")]
    assert results[0].run_dir == tmp_path / "runs" / "fold0" and len(results[0].history) == 1
    # rank 0 alone logs and prints: each line once
    assert out.count("epoch 1/1 loss") == 1 and "2 rank(s)" in out and "rank 0 of 2" in out
    assert out.count("fold 0: completed after 1 epoch(s)") == 1
    assert torch.load(tmp_path / "runs" / "fold0" / "last.pt", weights_only=True)["epoch"] == 1
    # a config this process has to read (for the time budget) is checked here, before any launch
    from kaggle_utils.config import ConfigError
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        train_torchrun(2, tmp_path / "missing.yaml", data_dir, tmp_path / "runs", folds=[0], device="cpu",
                       env={"PYTHONPATH": str(REPO)})
    # otherwise the launched processes find it, and their failure is the launch's
    with pytest.raises(RuntimeError, match="exited with status"):
        train_torchrun(2, tmp_path / "missing.yaml", data_dir, tmp_path / "runs", folds=[0], device="cpu",
                       time_budget=60.0, env={"PYTHONPATH": str(REPO)})


# ----------------------------------------------------------------------------------------------
# The loop's parts; train's faults as one line (issue 14)
# ----------------------------------------------------------------------------------------------


def test_stop_reasons_are_the_old_strings(tmp_path):
    from kaggle_utils.train import StopReason

    assert [r.value for r in StopReason] == ["completed", "early_stopping", "collapse", "time_limit", "callback",
                                             "time_budget"]
    r = TrainResult(tmp_path, fold=0, epochs_completed=1, best_epoch=None, best_score=None,
                    stopped=StopReason.EARLY_STOPPING)
    assert r.stopped == "early_stopping" and f"{r.stopped}" == str(r.stopped) == "early_stopping"
    r.save()
    assert json.loads((tmp_path / "result.json").read_text())["stopped"] == "early_stopping"
    assert TrainResult.load(tmp_path).stopped is StopReason.EARLY_STOPPING
    assert str(TrainResult.load(tmp_path)).startswith("fold 0: early_stopping after 1 epoch(s)")


def test_lr_schedule_and_removed_alias():
    import kaggle_utils.train as train_mod
    from kaggle_utils.train import LRSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = OptimConfig(lr=0.5, warmup_epochs=0.5, schedule="cosine", min_lr_ratio=0.1)
    new = LRSchedule(opt, cfg, 8, 4)
    with pytest.raises(AttributeError, match="LRSchedule") as info:
        train_mod.WarmupSchedule  # noqa: B018 - the removed deprecated alias
    assert "\n" not in str(info.value) and "WarmupSchedule" in str(info.value)
    assert new.factor(32) == pytest.approx(0.1)


def test_train_functions_are_short():
    """Issue 13: the loop is small steps; no function in the train package grows past ~80 lines again."""
    import ast

    long = {}
    for path in sorted((REPO / "kaggle_utils" / "train").glob("*.py")):
        tree = ast.parse(path.read_text())
        long.update({f"{path.name}::{n.name}": n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80})
    assert not long, long


def test_config_differences_names_dotted_keys():
    from kaggle_utils.train import config_differences

    old = {"train": {"epochs": 2, "seed": 0}, "model": {"encoder": "resnet18", "channels": [4, 8]}}
    new = {"train": {"epochs": 3, "seed": 0, "new_key": 1}, "model": {"encoder": "resnet34", "channels": [4, 8]}}
    assert config_differences(old, new) == [("model.encoder", "resnet18", "resnet34"), ("train.epochs", 2, 3)]
    assert config_differences(old, old) == []


def _cli(args, capsys):
    from kaggle_utils.cli import main

    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("fold", ["7", "-2", "3"])
def test_cli_fold_outside_n_folds_is_one_line(data_dir, tmp_path, capsys, fold):
    rc, _, err = _cli(["train", "--config", "smoke-cpu", "--fold", fold, "--data-dir", str(data_dir),
                       "--out", str(tmp_path / "run")], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "train.n_folds 3" in line and f"fold {fold}" in line and "0..2" in line, line
    assert not (tmp_path / "run").exists()


def test_one_scroll_advice_can_be_followed(tmp_path, capsys):
    from kaggle_utils.data import DataError
    from kaggle_utils.synthetic import generate_dataset

    one = generate_dataset(tmp_path / "one", n_train=2, n_test=0, size=40, n_scrolls=1, seed=1)
    with pytest.raises(DataError) as exc:
        train(tiny_cfg(), one, tmp_path / "refused", fold=0, progress=False, verbose=False)
    assert "use n_folds <= 1" in str(exc.value) and "train.n_folds" in str(exc.value) and "\n" not in str(exc.value)
    # the advice, followed: n_folds 1 trains fold 0 on every volume, nothing held out
    res = train(tiny_cfg(train={"n_folds": 1, "epochs": 1}, sampler={"patches_per_epoch": 2}), one, tmp_path / "all",
                fold=0, progress=False)
    assert (res.stopped, res.epochs_completed, res.best_epoch, res.oof_dir) == ("completed", 1, None, None)
    assert "val_dice" not in res.history[0] and not (tmp_path / "all" / "best.pt").exists()
    out = capsys.readouterr().out
    assert "2 training volume(s), 0 validation volume(s)" in out and "no held-out fold" in out
    with pytest.raises(ConfigError, match=r"fold 1: not a fold of train.n_folds 1; use fold 0 only"):
        train(tiny_cfg(train={"n_folds": 1}), one, tmp_path / "x", fold=1)
    with pytest.raises(ValueError, match="train.n_folds: must be >= 1"):
        tiny_cfg(train={"n_folds": 0})


def _fake_last(run: Path, cfg: TrainConfig, model_state=None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    torch.save({"config": to_dict(cfg), "model": model_state or {}, "epoch": 1}, run / "last.pt")


def test_resume_with_another_config_names_the_keys(data_dir, tmp_path, capsys):
    from kaggle_utils.models import build_model

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    other = tiny_cfg(model={"encoder": "resnet34"}, train={"epochs": 5, "num_workers": 3})
    _fake_last(tmp_path / "run", other, build_model(other.model).state_dict())
    base = ["train", "--config", str(cfg_path), "--fold", "0", "--data-dir", str(data_dir),
            "--out", str(tmp_path / "run"), "--no-progress"]
    rc, _, err = _cli(base + ["--resume"], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "model.encoder 'resnet34' -> 'resnet18'" in line and "train.epochs 5 -> 2" in line, line
    assert "num_workers" not in line and "--resume-force" in line  # a key that does not change training
    # forced: a different model still cannot continue; one line, no size-mismatch dump
    rc, _, err = _cli(base + ["--resume-force"], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "does not fit the configured model" in line and "new run folder" in line, line
    # an unreadable last.pt
    (tmp_path / "run" / "last.pt").write_bytes(b"not a checkpoint")
    rc, _, err = _cli(base + ["--resume"], capsys)
    assert rc == 2 and "not a readable training checkpoint" in _one_error_line(err)


@pytest.mark.slow
def test_resume_force_continues_with_more_epochs(data_dir, tmp_path, fold1_runs):
    cfg, full, full_dir, killed = fold1_runs
    shutil.copytree(killed, tmp_path / "run")
    longer = tiny_cfg(validation={"write_oof": False}, train={"epochs": 3})
    from kaggle_utils.config import ConfigError as CE

    with pytest.raises(CE, match=r"train.epochs 2 -> 3"):
        train(longer, data_dir, tmp_path / "run", fold=1, resume=True, progress=False, verbose=False)
    res = train(longer, data_dir, tmp_path / "run", fold=1, resume=True, allow_config_change=True, progress=False,
                verbose=False)
    assert res.epochs_completed == 3 and [r["epoch"] for r in res.history] == [1, 2, 3]
    assert "changed config (allow_config_change): train.epochs 2 -> 3" in (tmp_path / "run" / "train.log").read_text()


@pytest.fixture(scope="module")
def bad_label_data(data_dir, tmp_path_factory):
    """``data_dir`` with one training label holding the value 255."""
    import tifffile

    from kaggle_utils.data import load_index, split_fold

    root = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(data_dir, root)
    train_idx, _ = split_fold(load_index(root, "train"), 0, 3)
    bad = list(train_idx)[0].label_path
    label = tifffile.imread(bad)
    label[label == 1] = 255
    tifffile.imwrite(bad, label)
    return root, bad


def test_bad_label_precheck_is_one_line_before_training(bad_label_data, tmp_path):
    from kaggle_utils.data import DataError

    root, bad = bad_label_data
    with pytest.raises(DataError) as exc:
        train(tiny_cfg(train={"num_workers": 2}), root, tmp_path / "run", fold=0, progress=False, verbose=False)
    assert str(exc.value).startswith(f"{bad}: label values must be in {{0, 1, 2}}, found [255]"), exc.value
    assert not (tmp_path / "run" / "last.pt").exists()
    assert "checked" not in (tmp_path / "run" / "train.log").read_text()


def test_bad_label_in_a_worker_is_one_line_on_the_cli(bad_label_data, tmp_path, capsys):
    root, bad = bad_label_data
    data = json.loads(json.dumps(TINY))
    data["train"].update(num_workers=2, check_labels=False, epochs=1)  # the Kaggle config, pre-check off
    data["sampler"]["surface_share"] = 0.0
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    rc, _, err = _cli(["train", "--config", str(cfg_path), "--fold", "0", "--data-dir", str(root),
                       "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    line = _one_error_line(err)
    assert rc == 2 and line == f"error: {bad}: label values must be in {{0, 1, 2}}, found [255]", line


def test_truncated_training_image_is_a_corrupt_tiff_at_train_start(data_dir, tmp_path, capsys):
    """Not a 'label shape != image shape' message: the image's headers are checked before its label is compared."""
    from kaggle_utils.data import load_index, split_fold

    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    train_idx, _ = split_fold(load_index(root, "train"), 0, 3)
    img = list(train_idx)[0].image_path
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    rc, _, err = _cli(["train", "--config", str(cfg_path), "--fold", "0", "--data-dir", str(root),
                       "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    line = _one_error_line(err)
    assert rc == 2 and line.startswith(f"error: {img}: corrupt TIFF, truncated or damaged"), line
    assert "label shape" not in line and not (tmp_path / "run" / "last.pt").exists()


def test_shape_mismatch_on_a_held_out_volume_beyond_n_volumes_stops_train_at_start(data_dir, tmp_path):
    """Every id is checked, not only the validation.n_volumes scored each epoch: the others get out-of-fold
    probabilities at the end (and tune reads them)."""
    import tifffile

    from kaggle_utils.data import DataError, load_index, split_fold

    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    index = load_index(root, "train")
    first = list(index)[0]
    image, label = tifffile.imread(first.image_path), tifffile.imread(first.label_path)
    tifffile.imwrite(root / "train_images" / "999.tif", image)
    tifffile.imwrite(root / "train_labels" / "999.tif", label[:, :, :-8])  # 8 voxels short in x
    with open(root / "train.csv", "a") as fh:
        fh.write(f"999,{first.scroll_id}\n")
    fold = next(k for k in range(3) if len(split_fold(load_index(root, "train"), k, 3)[1]) == 2)
    assert [r.id for r in split_fold(load_index(root, "train"), fold, 3)[1]][1] == "999"  # beyond n_volumes 1
    with pytest.raises(DataError, match=r"999\.tif: label shape \(\d+, \d+, \d+\) != image shape"):
        train(tiny_cfg(train={"epochs": 1}), root, tmp_path / "run", fold=fold, progress=False, verbose=False)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:99", "gpu"])
def test_cli_unusable_device_is_one_line(data_dir, tmp_path, capsys, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    rc, _, err = _cli(["train", "--config", "smoke-cpu", "--data-dir", str(data_dir), "--out", str(tmp_path / "run"),
                       "--device", device], capsys)
    line = _one_error_line(err)
    assert rc == 2 and f"device '{device}'" in line, line
    assert ("sees no CUDA GPU" in line or "does not exist" in line) if device != "gpu" else "not a torch device" in line
    assert not (tmp_path / "run").exists()


def test_torchrun_command_passes_resume_force():
    from kaggle_utils.train import torchrun_command

    cmd = torchrun_command(2, "c.yaml", "d", "o", 1, resume=True, allow_config_change=True)
    assert "--resume-force" in cmd and "--resume" not in cmd
    assert "--resume" in torchrun_command(2, "c.yaml", "d", "o", 1, resume=True)
    # the newer CLI flags: the budget and the starting weights reach the subprocesses
    cmd = torchrun_command(2, "c.yaml", "d", "o", 1, time_budget=28800, init_from="runs/fold0/best.pt")
    assert cmd[cmd.index("--time-budget") + 1] == "28800" and cmd[cmd.index("--init-from") + 1] == "runs/fold0/best.pt"
    assert "--time-budget" not in torchrun_command(2, "c.yaml", "d", "o", 1)
    assert "--init-from" not in torchrun_command(2, "c.yaml", "d", "o", 1)
    from kaggle_utils.cli import build_parser

    args = build_parser().parse_args(cmd[cmd.index("train"):])  # the flags as the CLI reads them
    assert args.time_budget == 28800.0 and args.init_from == "runs/fold0/best.pt"


# ----------------------------------------------------------------------------------------------
# Issue 15: poly, --fold all, time budget, --init-from, ResEnc end to end
# ----------------------------------------------------------------------------------------------

RESENC_TINY = {"arch": "ResEncUNet", "n_stages": 4, "features_per_stage": [4, 8, 8, 8],
               "n_blocks_per_stage": [1, 1, 1, 1]}


def test_poly_schedule_values():
    from kaggle_utils.train import LRSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    cfg = OptimConfig(name="SGD", lr=0.01, warmup_epochs=0, schedule="poly", poly_exponent=0.9)
    s = LRSchedule(opt, cfg, steps_per_epoch=10, epochs=10)  # 100 steps
    assert s.factor(0) == 1.0 and s.factor(100) == 0.0
    assert s.factor(50) == pytest.approx(0.5 ** 0.9)
    assert s.factor(90) == pytest.approx(0.1 ** 0.9)
    now = [0.0]  # the budget's elapsed fraction instead of steps
    b = LRSchedule(opt, cfg, steps_per_epoch=10, epochs=10, budget_s=60.0, clock=lambda: now[0])
    now[0] = 30.0
    assert b.fraction() == pytest.approx(0.5) and b.factor(0) == pytest.approx(0.5 ** 0.9)
    now[0] = 90.0
    assert b.factor(0) == 0.0 and b.state_dict()["elapsed"] == 90.0


@pytest.mark.slow
def test_fold_all_trains_on_every_id_and_validates_listed_ids(data_dir, tmp_path, capsys):
    cfg = tiny_cfg(train={"epochs": 1}, validation={"ids": None})
    ids = [r["id"] for r in __import__("csv").DictReader(open(data_dir / "train.csv"))]
    cfg.validation.ids = ids[:1]
    r = train(cfg, data_dir, tmp_path / "all", fold="all", progress=False)
    assert r.fold == "all" and r.oof_dir is None and TrainResult.load(tmp_path / "all").fold == "all"
    log = (tmp_path / "all" / "train.log").read_text()
    assert f"{len(ids)} training volume(s), 0 validation volume(s) (1 validated)" in log
    assert "val_dice" in r.history[-1]


@pytest.mark.slow
def test_budgeted_run_ends_inside_its_budget_with_oof(data_dir, tmp_path):
    import time

    cfg = tiny_cfg(model=RESENC_TINY, loss={"deep_supervision": True},
                   optim={"name": "SGD", "lr": 0.01, "momentum": 0.99, "schedule": "poly", "grad_clip": 12.0},
                   # no early stopping: on a quiet machine ten 0.3 s validations without progress come long
                   # before the budget ends, and this test is about the budget
                   train={"epochs": 10000, "budget_reserve": 0.3}, validation={"every": 1, "patience": None})
    budget = 60.0
    t0 = time.monotonic()
    r = train(cfg, data_dir, tmp_path / "b", fold=0, time_budget=budget, progress=False)
    took = time.monotonic() - t0
    assert r.stopped == "time_budget" and took < budget, took
    assert (tmp_path / "b" / "best.pt").is_file() and (tmp_path / "b" / "last.pt").is_file()
    assert r.oof_dir is not None and list(r.oof_dir.glob("*.npz"))
    assert "val_dice" in r.history[-1]  # the final epoch was validated


@pytest.mark.slow
def test_init_from_trains_at_a_new_patch_size_and_predict_needs_only_the_checkpoint(data_dir, tmp_path, capsys):
    from kaggle_utils.cli import main

    first = tiny_cfg(model=RESENC_TINY, train={"epochs": 1})
    train(first, data_dir, tmp_path / "p32", fold=0, progress=False)
    w32 = _weights(tmp_path / "p32" / "best.pt")
    bigger = tiny_cfg(model=RESENC_TINY, train={"epochs": 1}, sampler={"patch_size": [64, 64, 64]},
                      validation={"patch_size": [64, 64, 64]}, inference={"patch_size": [64, 64, 64]})
    r = train(bigger, data_dir, tmp_path / "p64", fold=0, progress=False, init_from=tmp_path / "p32" / "best.pt")
    assert r.epochs_completed == 1
    assert "initialized the weights from" in (tmp_path / "p64" / "train.log").read_text()
    ck = torch.load(tmp_path / "p64" / "last.pt", weights_only=True)
    assert ck["config"]["sampler"]["patch_size"] == [64, 64, 64] and ck["scheduler"]["step_count"] == 2
    assert any(not torch.equal(w32[k], v) for k, v in ck["model"].items())  # trained on from there
    # a checkpoint of another network is one line naming both
    with pytest.raises(ConfigError, match="train.init_from: .* does not fit model ResEncUNet"):
        train(tiny_cfg(model=dict(RESENC_TINY, features_per_stage=[8, 8, 8, 8]), train={"epochs": 1}),
              data_dir, tmp_path / "bad", fold=0, progress=False, init_from=tmp_path / "p32" / "best.pt")
    # predict rebuilds the ResEnc from the checkpoint alone
    rc = main(["predict", "--checkpoint", str(tmp_path / "p64" / "best.pt"), "--data-dir", str(data_dir),
               "--out", str(tmp_path / "sub.zip"), "--device", "cpu"])
    assert rc == 0 and (tmp_path / "sub.zip").is_file()


# ----------------------------------------------------------------------------------------------
# Issue 14: the collapse guard in the loop (a run that was flagged says so at the end)
# ----------------------------------------------------------------------------------------------

LABEL_SHARE = 0.2  # the replayed validations' labelled surface share


def _replay(monkeypatch, ratios: list[float]) -> None:
    """Replace training and validation by instant fakes: each validation predicts ``ratio`` x the
    labelled share on 2 volumes (the loop, the guard, checkpoints and logs are the real ones)."""
    import kaggle_utils.train as train_mod
    import kaggle_utils.train.loop as loop_mod
    import kaggle_utils.train.validation as validation_mod

    queue = list(ratios)

    def fake_epoch(state, epoch):
        return {"epoch": epoch + 1, "lr": state.schedule.lr, "train_loss": 0.5,
                **{f"train_{n}": 0.1 for n in state.part_names if n != "total"}}

    def fake_validate(model, records, cfg, device, progress=False):
        fg = queue.pop(0) * LABEL_SHARE
        rows = [{"id": f"v{i}", "scroll_id": "s", "dice": 0.5, "fg": fg, "label_fg": LABEL_SHARE, "prob_std": 0.3}
                for i in range(2)]
        own = train_mod.validation_verdict(rows, cfg.validation)
        summary = {"val_dice": 0.5, "val_score": None, "val_topo": None, "val_sd": None, "val_voi": None,
                   "val_fg_pct": 100 * fg, "val_fg_min_pct": 100 * fg, "val_fg_max_pct": 100 * fg,
                   "val_label_fg_pct": 100 * LABEL_SHARE, "val_prob_std": 0.3,
                   "collapse": own.kind, "collapse_reasons": "; ".join(own.reasons)}
        return summary, rows

    monkeypatch.setattr(loop_mod, "_train_epoch", fake_epoch)
    monkeypatch.setattr(validation_mod, "validate_volumes", fake_validate)


def test_flagged_run_says_so_at_the_end(data_dir, tmp_path, monkeypatch, capsys):
    # flagged (2.5x), then 1.7x: below the 2x flag limit, a single validation would look healthy,
    # but the run is not back under the 1.5x recovery limit, then 1.2x: recovered
    _replay(monkeypatch, [2.5, 1.7, 1.2])
    cfg = tiny_cfg(validation={"write_oof": False, "patience": None}, train={"epochs": 3})
    run = tmp_path / "run"
    res = train(cfg, data_dir, run, fold=0, progress=False)
    assert [h["collapse"] for h in res.history] == ["foreground", "foreground", "healthy"]
    assert [h["collapse_state"] for h in res.history] == ["collapsed", "collapsed", "recovered"]
    assert "not recovered" in res.history[1]["collapse_reasons"]
    assert res.collapse == "recovered"
    assert res.collapse_summary.startswith("collapse guard: FLAGGED EARLIER, recovered: flagged at epoch(s) 1, 2 ")
    assert "since epoch 3" in res.collapse_summary and res.collapse_summary in str(res)
    # result.json, read back
    data = json.loads((run / "result.json").read_text())
    assert data["collapse"] == "recovered" and data["collapse_guard"]["flagged_epochs"] == [1, 2]
    back = TrainResult.load(run)
    assert (back.collapse, back.collapse_summary) == (res.collapse, res.collapse_summary)
    assert back.collapse_guard["history"][1]["ratio"] == pytest.approx(1.7)
    # the fold's last log line, a warning; the metrics row and both checkpoints carry the guard
    last = (run / "train.log").read_text().strip().splitlines()[-1]
    assert " WARNING " in last and res.collapse_summary in last
    assert "(run flagged earlier, recovered)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["collapse_state"] for r in rows] == ["collapsed", "collapsed", "recovered"]
    last_guard = torch.load(run / "last.pt", weights_only=True)["collapse_guard"]
    assert last_guard["flagged_epochs"] == [1, 2] and last_guard == res.collapse_guard
    best = torch.load(run / "best.pt", weights_only=True)  # the guard as of best.pt's own epoch (1, flagged)
    assert best["epoch"] == 1 and best["collapse_guard"]["state"] == "collapsed"
    assert best["collapse_guard"]["flagged_epochs"] == [1]


def test_run_ending_at_1_7x_after_a_flag_ends_collapsed(data_dir, tmp_path, monkeypatch):
    _replay(monkeypatch, [2.5, 1.7])
    res = train(tiny_cfg(validation={"write_oof": False}), data_dir, tmp_path / "run", fold=0, progress=False)
    assert res.stopped == "completed" and res.collapse == "collapsed"  # on_collapse warn: it only says so
    assert res.collapse_summary.startswith("collapse guard: COLLAPSED: flagged at epoch(s) 1, 2 ")
    assert "COLLAPSED" in (tmp_path / "run" / "train.log").read_text().strip().splitlines()[-1]


def test_healthy_run_summary_is_an_info_line(data_dir, tmp_path, monkeypatch):
    _replay(monkeypatch, [1.2, 1.0])
    res = train(tiny_cfg(validation={"write_oof": False}), data_dir, tmp_path / "run", fold=0, progress=False)
    assert res.collapse == "healthy" and res.collapse_summary.startswith("collapse guard: healthy, never flagged in 2")
    last = (tmp_path / "run" / "train.log").read_text().strip().splitlines()[-1]
    assert " INFO " in last and "never flagged" in last


def test_on_collapse_stop_waits_for_flags_in_a_row(data_dir, tmp_path, monkeypatch):
    from kaggle_utils.collapse import COLLAPSE_STOP_AFTER

    assert COLLAPSE_STOP_AFTER == 3
    # flagged twice (a young healthy run can be), recovered, then flagged 3 times in a row: stop at the 3rd
    _replay(monkeypatch, [3.0, 3.0, 1.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    cfg = tiny_cfg(validation={"write_oof": False, "on_collapse": "stop", "patience": None}, train={"epochs": 8})
    res = train(cfg, data_dir, tmp_path / "run", fold=0, progress=False)
    assert res.stopped == "collapse" and res.epochs_completed == 6
    assert res.collapse == "collapsed" and "epoch(s) 1, 2, 4, 5, 6 " in res.collapse_summary
    log = (tmp_path / "run" / "train.log").read_text()
    assert "flagged 3 validation(s) in a row up to epoch 6" in log and log.count("on_collapse is 'stop'") == 1
    # two in a row and recovered: never stopped
    _replay(monkeypatch, [3.0, 3.0, 1.0, 1.0])
    cfg = tiny_cfg(validation={"write_oof": False, "on_collapse": "stop", "patience": None}, train={"epochs": 4})
    res = train(cfg, data_dir, tmp_path / "run2", fold=0, progress=False)
    assert res.stopped == "completed" and res.epochs_completed == 4 and res.collapse == "recovered"


def test_guard_survives_a_resume(data_dir, tmp_path, monkeypatch):
    ratios = [2.5, 1.7, 1.2, 1.0]
    cfg = tiny_cfg(validation={"write_oof": False, "patience": None}, train={"epochs": 4})
    _replay(monkeypatch, ratios)
    full = train(cfg, data_dir, tmp_path / "full", fold=0, progress=False)

    class Killed(Exception):
        pass

    def kill_after_second(row):
        if row["epoch"] == 2:
            raise Killed

    _replay(monkeypatch, ratios)
    with pytest.raises(Killed):
        train(cfg, data_dir, tmp_path / "run", fold=0, progress=False, on_epoch_end=kill_after_second)
    _replay(monkeypatch, ratios[2:])
    resumed = train(cfg, data_dir, tmp_path / "run", fold=0, resume=True, progress=False)
    assert resumed.collapse_guard == full.collapse_guard  # the flags of the first session are remembered
    assert resumed.collapse == "recovered" and "epoch(s) 1, 2 " in resumed.collapse_summary


def test_validation_collapse_limits_default_to_the_diagnostics_rule():
    from kaggle_utils import collapse
    from kaggle_utils.train import ValidationConfig

    vc = ValidationConfig()
    assert (vc.collapse_max_ratio, vc.collapse_max_fg, vc.collapse_recover_ratio, vc.collapse_stop_after) == (
        collapse.COLLAPSE_MAX_RATIO, collapse.COLLAPSE_MAX_FG, collapse.COLLAPSE_RECOVER_RATIO,
        collapse.COLLAPSE_STOP_AFTER)
    with pytest.raises(ValueError, match="validation.collapse_stop_after"):
        ValidationConfig(collapse_stop_after=0)
    with pytest.raises(ValueError, match="validation.collapse_recover_ratio"):
        ValidationConfig(collapse_max_ratio=2.0, collapse_recover_ratio=2.5)


def test_resenc_budget_ends_before_the_notebook_hard_stop():
    nb = json.loads((REPO / "notebooks" / "train.ipynb").read_text())
    src = "".join("".join(c["source"]) for c in nb["cells"])
    hard_stop = eval(src.split("TIME_LIMIT_S = ")[1].split("#")[0])  # noqa: S307 - our own notebook's constant
    budget = load_train_config("kaggle-t4-resenc-m").train.time_budget_s
    assert budget is not None and budget < hard_stop


@pytest.mark.slow
def test_budgeted_run_times_a_validation_early_when_none_is_due(data_dir, tmp_path):
    """``validation.every`` far beyond the run and a 1 % reserve: without the early timed validation the
    final validation, scoring and out-of-fold pass would start when 99 % of the budget is gone."""
    import time

    cfg = tiny_cfg(model=RESENC_TINY, train={"epochs": 10000, "budget_reserve": 0.01},
                   validation={"every": 10000, "patience": None, "n_score": 1, "n_volumes": 1})
    budget = 40.0
    t0 = time.monotonic()
    r = train(cfg, data_dir, tmp_path / "b", fold=0, time_budget=budget, progress=False)
    took = time.monotonic() - t0
    assert r.stopped == "time_budget" and took < budget, took
    assert "val_score" in r.history[0] and "val_score" in r.history[-1]  # timed after epoch 1, and at the end
    assert not any("val_score" in row for row in r.history[1:-1])
    assert r.oof_dir is not None and list(r.oof_dir.glob("*.npz"))


# ---------------------------------------------------------------------------------- issue 25: budgets


def _record_folds(monkeypatch):
    """Replace train.train with a recorder of (fold, time_budget) that trains nothing."""
    import types

    import kaggle_utils.train as T
    import kaggle_utils.train.sessions as sessions

    seen = []

    def fake(cfg, data_dir, out_dir, fold=0, time_limit=None, time_budget=None, **kwargs):
        seen.append((fold, time_budget))
        return types.SimpleNamespace(stopped="time_budget", fold=fold)

    monkeypatch.setattr(T, "train", fake)  # the CLI's one fold
    monkeypatch.setattr(sessions, "train", fake)  # train_folds
    return seen


def test_fold_minus_one_plans_the_whole_run_inside_the_budget(tmp_path, monkeypatch, capsys):
    """Issue 25: --time-budget with --fold -1 applied to every fold (3 folds x 40 s took 147 s), and
    kaggle-t4-resenc-m's 8-hour budget with the notebook's FOLD = -1 planned 40 hours."""
    from kaggle_utils.cli import main
    from kaggle_utils.train import train_folds

    seen = _record_folds(monkeypatch)
    cfg = tiny_cfg()
    train_folds(cfg, tmp_path, tmp_path / "run", time_budget=40.0)
    assert [f for f, _ in seen] == [0, 1, 2] and sum(b for _, b in seen) == pytest.approx(40.0)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "time budget 40s for the whole run of 3 fold(s) [0, 1, 2]: 13s per fold" in log
    assert log.count("\n") == 1  # one line says how the budget was split
    # the config's budget is the whole run's too (the notebook passes none on the command line)
    seen.clear()
    assert main(["train", "--config", "kaggle-t4-resenc-m", "--fold", "-1", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r2")]) == 0
    n = load_train_config("kaggle-t4-resenc-m").train.n_folds
    assert len(seen) == n and sum(b for _, b in seen) == pytest.approx(8 * 3600)
    assert "time budget 28800s for the whole run of 5 fold(s)" in capsys.readouterr().out
    # one fold keeps its whole budget
    seen.clear()
    assert main(["train", "--config", "kaggle-t4-resenc-m", "--fold", "0", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r3"), "--time-budget", "100"]) == 0
    assert seen == [(0, 100.0)]


def test_train_torchrun_splits_the_budget_over_its_folds(tmp_path, monkeypatch, capsys):
    import kaggle_utils.train as T
    import kaggle_utils.train.sessions as sessions

    budgets = []

    class Stop(Exception):
        pass

    def fake_command(*args, time_budget=None, **kwargs):
        budgets.append(time_budget)
        raise Stop

    monkeypatch.setattr(sessions, "torchrun_command", fake_command)
    with pytest.raises(Stop):
        T.train_torchrun(2, "kaggle-t4-resenc-m", tmp_path, tmp_path / "run")
    assert budgets == [pytest.approx(8 * 3600 / 5)]
    assert "time budget 28800s for the whole run of 5 fold(s) [0, 1, 2, 3, 4]: 5760s per fold" in capsys.readouterr().out


def test_budget_warmup_ends_by_a_share_of_the_budget():
    """A budget shorter than the step-counted warm-up still warms up, then anneals: the issue's run
    did 94 of its 100 warm-up steps in the budget and ended at 94 % of the peak LR."""
    from kaggle_utils.train import BUDGET_WARMUP_SHARE, LRSchedule

    now = [0.0]
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = LRSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=1), steps_per_epoch=100, epochs=10**6,
                       budget_s=100.0, clock=lambda: now[0])
    lrs = []
    for _ in range(94):  # one step per second of a 100 s training phase
        now[0] += 1.0
        sched.step()
        lrs.append(sched.lr)
    assert lrs[-1] < 0.05, lrs[-1]  # annealed (cosine towards min_lr_ratio 0.01), not 0.94
    warm = int(BUDGET_WARMUP_SHARE * 100)
    assert max(lrs) == pytest.approx(lrs[warm - 1], abs=0.05) and max(lrs) > 0.95  # warmed up by 10 % of it
    assert lrs[warm // 2 - 1] == pytest.approx(0.01 + 0.99 * 0.5, abs=0.02)
    unbudgeted = LRSchedule(opt, OptimConfig(lr=1.0, warmup_epochs=2), steps_per_epoch=10, epochs=100)
    assert unbudgeted.warmup_done(5) == 0.25 and unbudgeted.factor(5) == pytest.approx(0.01 + 0.99 * 0.25)


@pytest.mark.slow
def test_fold_all_with_a_short_budget_ends_annealed_and_claims_nothing_it_did_not_do(data_dir, tmp_path):
    """Issue 25: --fold all with a short budget ended at 94 % of the peak LR, inside a warm-up counted in
    steps, and logged a validation, out-of-fold predictions and "best None at epoch None"."""
    cfg = tiny_cfg(optim={"lr": 0.002, "warmup_epochs": 1}, sampler={"patches_per_epoch": 2000},
                   train={"epochs": 1000}, validation={"ids": None})
    r = train(cfg, data_dir, tmp_path / "all", fold="all", time_budget=12.0, progress=False)
    assert r.stopped == "time_budget"
    assert r.history[-1]["lr"] <= 0.1 * cfg.optim.lr, r.history[-1]["lr"]  # annealed
    log = (tmp_path / "all" / "train.log").read_text()
    assert "None" not in log and "wrote out-of-fold" not in log
    assert "validated;" not in log and "the rest of the budget is for out-of-fold" not in log
    assert "no validation or out-of-fold predictions (nothing held out): last.pt is the model" in log
    assert "no validation score (nothing validated): last.pt is the model" in log
    assert "None" not in str(r)
