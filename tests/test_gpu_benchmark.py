"""Smoke test of ``benchmarks/gpu.py`` (issue 23): the one-call GPU check must not fail on a typo when it
finally runs on a GPU, so CI runs it on the CPU with tiny sizes (``--device cpu --quick``), and its
recording (errors kept, budget respected, JSON rewritten after each measurement) is tested alone."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recorder_keeps_errors_skips_over_budget_and_rewrites_the_json(tmp_path):
    gpu = _gpu_module()
    rec = gpu.Recorder(tmp_path, budget_s=100.0)
    rec.run("fails", 1.0, lambda: 1 / 0)
    assert json.loads((tmp_path / gpu.RESULTS_NAME).read_text())["measurements"][0]["status"] == "error"
    rec.run("works", 1.0, lambda: {"step_s": 0.5})
    rec.run("too long", 1e6, lambda: {"step_s": 1.0})
    rows = json.loads((tmp_path / gpu.RESULTS_NAME).read_text())["measurements"]
    assert [r["status"] for r in rows] == ["error", "ok", "skipped"]
    assert rows[0]["error"].startswith("ZeroDivisionError") and "budget" in rows[2]["note"]
    table = gpu.table(rec.data)
    assert "| works | ok | 0.500 |" in table and "| fails | error |" in table
    assert rows[1]["wall_s"] >= 0


def test_presets_are_the_shipped_kaggle_configs_recommended_first():
    gpu = _gpu_module()
    presets = gpu.kaggle_presets()
    assert presets[0] == "kaggle-t4-resenc-m" and set(presets) >= {"kaggle-t4", "kaggle-t4-resenc-m-ft192"}


@pytest.mark.slow
def test_gpu_benchmark_quick_on_cpu_runs_every_measurement(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                           "--out", str(out), "--budget-s", "900"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "gpu_results.json").read_text())
    assert {"torch", "cuda", "cudnn", "device_name", "slow_conv3d_amp"} <= set(data["env"])
    rows = {m["name"]: m for m in data["measurements"]}
    for preset in ("kaggle-t4-resenc-m", "kaggle-t4", "kaggle-t4-resenc-m-ft192"):
        for kind in ("train step", "train step channels_last", "fit 1 steps", "predict 32^3 x8 TTA", "fp16 vs fp32"):
            assert rows[f"{preset}: {kind}"]["status"] == "ok", rows[f"{preset}: {kind}"]
    step = rows["kaggle-t4-resenc-m: train step"]
    assert step["step_s"] > 0 and 0 <= step["wait_share"] < 1 and step["peak_gib"] > 0 and step["tflops"] > 0
    assert rows["kaggle-t4: predict 32^3 x8 TTA"]["passes"] == 8 and rows["kaggle-t4: predict 32^3 x8 TTA"]["predict_s"] > 0
    assert 0 <= rows["kaggle-t4: fp16 vs fp32"]["flip_share"] <= 1
    assert rows["kaggle-t4-resenc-m: DDP 2 processes"]["status"] == "skipped"
    assert "| kaggle-t4: train step | ok |" in (out / "table.md").read_text()
