"""Runtime environment checks: the torch 2.9 conv3d AMP warning and numba's cache on a read-only install."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kaggle_utils import device as device_mod
from kaggle_utils.device import slow_conv3d_amp, warn_slow_conv3d_amp
from kaggle_utils.environment import ensure_numba_cache_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "torch_version, cudnn, slow",
    [
        ("2.9.0+cu126", 91002, True),  # Kaggle's Feb 2026 image
        ("2.9.0", 91500, True),  # 2.9.0 disables cuDNN for every version
        ("2.9.1+cu128", 91002, True),
        ("2.9.1+cu128", 91500, False),  # re-enabled from cuDNN 9.15
        ("2.9.1", None, True),
        ("2.8.0+cu126", 91002, False),
        ("2.10.0", 91002, False),
        ("2.14.1+cu130", 92400, False),
    ],
)
def test_slow_conv3d_amp_known_versions(torch_version, cudnn, slow):
    assert slow_conv3d_amp(torch_version, cudnn) is slow


def test_warn_slow_conv3d_amp_once_on_cuda_with_amp(monkeypatch, caplog):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.9.0+cu126")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(device_mod, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="kaggle_utils.device"):
        assert not warn_slow_conv3d_amp("cpu", True)  # CPUs are not affected
        assert not warn_slow_conv3d_amp("cuda", False)  # nor full precision
        assert warn_slow_conv3d_amp("cuda", True) and warn_slow_conv3d_amp(torch.device("cuda", 1), True)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1, msgs  # once per process
    assert "2.9.0+cu126" in msgs[0] and "166122" in msgs[0] and "2.8" in msgs[0] and "2.10" in msgs[0]
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    monkeypatch.setattr(device_mod, "_warned", False)
    assert not warn_slow_conv3d_amp("cuda", True)


def test_predict_warns_on_torch_2_9_cuda(monkeypatch, tmp_path):
    # predict_dataset checks the device it moves the models to; the check itself needs no GPU
    calls = []
    monkeypatch.setattr(device_mod, "warn_slow_conv3d_amp", lambda device, amp: calls.append((str(device), amp)))
    import torch

    from kaggle_utils.predict import predict_dataset
    from kaggle_utils.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", n_train=1, n_test=1, size=32, n_scrolls=1, seed=0)
    model = torch.nn.Conv3d(1, 1, 1)
    predict_dataset(models=[model], data_dir=data, out_zip=tmp_path / "s.zip", device="cpu",
                    inference_cfg={"patch_size": [32, 32, 32]}, progress=False)
    assert calls == [("cpu", False)]


def test_ensure_numba_cache_dir_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere")
    assert ensure_numba_cache_dir(tmp_path) is None  # an explicit setting wins
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    assert ensure_numba_cache_dir(tmp_path) is None  # writable: numba caches beside the source
    assert "NUMBA_CACHE_DIR" not in os.environ


RO_SCRIPT = """
import json, os, sys
if sys.argv[2] == "root":  # root may write anywhere: report the copy as a read-only mount would
    _access = os.access
    os.access = lambda p, mode, **kw: False if (mode & os.W_OK and str(p).startswith(sys.argv[1])) else _access(p, mode, **kw)
import kaggle_utils
import numba
from kaggle_utils.metrics import topo  # imports numba's njit kernels (compiles lazily)
cache = os.environ.get("NUMBA_CACHE_DIR")
print(json.dumps({"file": kaggle_utils.__file__, "env": cache, "numba": numba.config.CACHE_DIR,
                  "writable": bool(cache) and os.access(cache, os.W_OK)}))
"""


def test_read_only_install_gets_a_writable_numba_cache(tmp_path):
    """A copy of the package on a read-only path: importing it sets NUMBA_CACHE_DIR before numba loads."""
    root = tmp_path / "ro"
    shutil.copytree(REPO / "kaggle_utils", root / "kaggle_utils", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for p in [root, *root.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        env.update(PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
        who = "root" if os.geteuid() == 0 else "user"
        out = subprocess.run([sys.executable, "-c", RO_SCRIPT, str(root), who], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["file"].startswith(str(root))
        assert got["env"] and got["writable"] and got["numba"] == got["env"]
        assert not got["env"].startswith(str(root))
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(stat.S_IRWXU)


# ------------------------------------------------------------------ a GPU the installed torch cannot run

CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # the image's cu128 torch


@pytest.mark.parametrize("capability, arch_list, runs", [
    ((6, 0), CU128, False),  # P100: what a push without machine_shape has been reported to get
    ((7, 0), CU128, False),  # V100
    ((7, 5), CU128, True),  # T4: machine_shape NvidiaTeslaT4
    ((8, 9), CU128, True),  # L4: sm_86 kernels run on 8.9 (same major)
    ((12, 1), CU128, True),
    ((6, 0), ["sm_50", "sm_60", "sm_70", "sm_75"], True),  # an older cu118 build still has sm_60
    ((6, 1), ["sm_60"], True),
    ((5, 2), ["sm_60", "compute_50"], True),  # PTX compiled just in time
    ((6, 0), [], True),  # a build that lists nothing: CUDA decides
])
def test_gpu_arch_problem_compares_capability_with_the_build(capability, arch_list, runs):
    from kaggle_utils.device import gpu_arch_problem

    problem = gpu_arch_problem(capability, arch_list, "Tesla P100-PCIE-16GB", "2.10.0+cu128")
    assert (problem is None) is runs
    if not runs:
        sm = f"sm_{capability[0]}{capability[1]}"
        assert problem.startswith(f"Tesla P100-PCIE-16GB ({sm}) cannot run this torch 2.10.0+cu128 (built for sm_75")
        assert '"machine_shape": "NvidiaTeslaT4"' in problem and "\n" not in problem


def _fake_p100(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(CU128))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")


@pytest.mark.parametrize("command", ["train", "predict"])
def test_train_and_predict_stop_in_one_line_on_a_gpu_torch_cannot_run(command, tiny_train_data, tmp_path,
                                                                      monkeypatch, capsys):
    import kaggle_utils.data as data_mod
    from kaggle_utils.cli import main

    _fake_p100(monkeypatch)
    monkeypatch.setattr(data_mod, "read_volume", lambda path: (_ for _ in ()).throw(AssertionError("work")))
    argv = {"train": ["train", "--config", "smoke-cpu", "--data-dir", str(tiny_train_data), "--out",
                      str(tmp_path / "run"), "--device", "cuda"],
            "predict": ["predict", "--checkpoint", str(tmp_path / "m.pt"), "--data-dir", str(tiny_train_data),
                        "--out", str(tmp_path / "s.zip"), "--device", "cuda"]}[command]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: Tesla P100-PCIE-16GB (sm_60) cannot run this torch") and "NvidiaTeslaT4" in lines[0]
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "s.zip").exists()
