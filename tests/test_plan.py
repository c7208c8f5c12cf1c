"""Tests for kaggle_utils.plan: FLOP and activation counts on the meta device, window counts, what fits a
budget, and ``train --dry-run`` (a few real steps, nothing written but ``dry_run.json``)."""

from __future__ import annotations

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

from kaggle_utils.cli import main
from kaggle_utils.models import ModelConfig
from kaggle_utils.plan import T4, fit_budget, forward_cost, project_seconds, step_cost, window_count

warnings.filterwarnings("ignore", category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]

RESENC = {"arch": "ResEncUNet", "n_stages": 3, "features_per_stage": [4, 8, 8], "strides": [1, 2, 2],
          "n_blocks_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1]}


def test_step_cost_counts_a_known_network_and_grows_with_the_batch():
    cfg = ModelConfig(**RESENC)
    one = step_cost(cfg, (32, 32, 32), 1)
    two = step_cost(cfg, (32, 32, 32), 2)
    assert two.forward_flops == pytest.approx(2 * one.forward_flops)
    assert two.saved_bytes == pytest.approx(2 * one.saved_bytes, rel=0.01)
    assert 2.5 < one.step_flops / one.forward_flops < 3.5  # backward ~ 2 forwards
    # the stem alone: 2 * 32^3 voxels * 4 out * 1 in * 27 taps FLOPs (a lower bound of the whole)
    assert one.forward_flops > 2 * 32**3 * 4 * 27
    assert one.params == sum(p.numel() for p in __import__("kaggle_utils.models", fromlist=["x"])
                             .build_model(cfg).parameters())
    half = step_cost(cfg, (32, 32, 32), 1, dtype=torch.float16)
    assert half.saved_bytes == pytest.approx(one.saved_bytes / 2, rel=0.05)
    assert forward_cost(cfg, (32, 32, 32)) == pytest.approx(one.forward_flops, rel=0.05)  # eval: no extra heads


def test_step_cost_of_a_single_convolution_is_the_textbook_count():
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 4, 3, padding=1, bias=False)

        def forward(self, x):
            return self.conv(x)

    import kaggle_utils.plan as plan

    real = plan._meta_model
    plan._meta_model = lambda cfg, ds, dtype: One().to("meta", dtype)
    try:
        cost = step_cost(None, (8, 8, 8), 2)
    finally:
        plan._meta_model = real
    assert cost.forward_flops == 2 * 2 * 8**3 * 4 * 27  # 2 FLOPs per multiply-add
    assert cost.step_flops == 2 * cost.forward_flops  # weight gradient only: the input needs none


def test_window_count_matches_the_inference_plan():
    assert window_count((320, 320, 320), (128, 128, 128), 0.5) == 4**3
    assert window_count((320, 320, 320), (192, 192, 192), 0.5) == 3**3
    assert window_count((320, 320, 320), (128, 128, 128), 0.25) == 3**3
    assert window_count((256, 256, 256), (128, 128, 128), 0.5) == 3**3


def test_fit_budget_known_answers():
    fit = fit_budget(step_s=1.5, steps_per_epoch=250, patches_per_epoch=500, world=2, epochs=100000,
                     time_budget_s=28800, time_limit_s=None, budget_reserve=0.05)
    assert fit.epoch_s == 375 and fit.train_s == pytest.approx(27360)
    assert fit.epochs == 72 and fit.patches == 72 * 500 * 2
    limit = fit_budget(0.3, 250, 500, 1, 60, None, 30600, 0.1)
    assert limit.train_s == 30600 and limit.epochs == 408 and limit.config_epochs_s == pytest.approx(60 * 75)
    assert fit_budget(0.3, 250, 500, 1, 60, None, None, 0.1).epochs is None
    assert project_seconds(65e12, T4, 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="efficiency"):
        project_seconds(1.0, T4, 0.0)


def _tiny_yaml(tmp_path: Path, **train) -> Path:
    cfg = {"model": RESENC, "loss": {"name": "default", "deep_supervision": True},
           "sampler": {"patch_size": [32, 32, 32], "patches_per_epoch": 4},
           "train": {"epochs": 2, "batch_size": 2, "num_workers": 0, "n_folds": 3, "amp": "off",
                     "time_budget_s": 600, **train},
           "validation": {"patch_size": [32, 32, 32]}, "inference": {"patch_size": [32, 32, 32]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_dry_run_prints_the_plan_and_writes_json(tiny_train_data, tmp_path, capsys):
    cfg = _tiny_yaml(tmp_path)
    rc = main(["train", "--config", str(cfg), "--data-dir", str(tiny_train_data), "--out", str(tmp_path / "run"),
               "--device", "cpu", "--dry-run", "--dry-run-steps", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "dry run of" in out and "s/step (median)" in out and "data-loader wait" in out
    assert "peak memory" in out and "process peak RSS" in out and "fits" in out
    report = json.loads((tmp_path / "run" / "dry_run.json").read_text())
    assert report["steps"] == 2 and len(report["step_times"]) == 2 and report["device"] == "cpu"
    assert report["patch_size"] == [32, 32, 32] and report["batch_size"] == 2
    assert 0 <= report["wait_share"] < 1 and report["peak_memory_bytes"] > 0 and np.isfinite(report["loss"])
    assert report["step_flops"] > 0 and report["fit"]["epochs"] >= 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dry_run.json"]  # no checkpoint, no log


def test_dry_run_bad_steps_is_one_line(tiny_train_data, tmp_path, capsys):
    rc = main(["train", "--config", str(_tiny_yaml(tmp_path)), "--data-dir", str(tiny_train_data),
               "--out", str(tmp_path / "run"), "--device", "cpu", "--dry-run", "--dry-run-steps", "0"])
    assert rc == 2 and capsys.readouterr().err.strip() == "error: --dry-run-steps: must be >= 1, got 0"


@pytest.mark.slow
def test_dry_run_under_torchrun_steps_both_gloo_ranks(tiny_train_data, tmp_path):
    cfg = _tiny_yaml(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kaggle_utils",
         "train", "--config", str(cfg), "--data-dir", str(tiny_train_data), "--out", str(tmp_path / "run"),
         "--device", "cpu", "--dry-run", "--dry-run-steps", "1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("dry run of") == 1 and "(2 rank(s))" in out.stdout
    report = json.loads((tmp_path / "run" / "dry_run.json").read_text())
    assert report["world"] == 2 and report["fit"]["patches"] == report["fit"]["epochs"] * 4 * 2
