"""Kaggle packaging: kernel metadata passes the Kaggle CLI's validation offline; the wheel set installs offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PUSH = """
import sys
from kaggle.api.kaggle_api_extended import KaggleApi
api = KaggleApi()
api.authenticate()
try:
    api.kernels_push(sys.argv[1])
except ValueError as exc:
    print("VALIDATION-ERROR", exc)
    sys.exit(3)
except Exception as exc:  # the proxy refuses: validation passed, the upload was attempted
    print("REACHED-NETWORK", type(exc).__name__)
    sys.exit(0)
print("UNEXPECTED-SUCCESS")
sys.exit(4)
"""


def _push(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        KAGGLE_USERNAME="kaggleuser", KAGGLE_KEY="0" * 32, KAGGLE_CONFIG_DIR=str(tmp_path / "kaggle-cfg"),
        HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="",
    )
    return subprocess.run([sys.executable, "-c", _PUSH, str(folder)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("folder", [".", "notebooks/train"])
def test_kernel_metadata_passes_kaggle_validation(folder, tmp_path):
    meta = json.loads((REPO / folder / "kernel-metadata.json").read_text())
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True and meta["kernel_type"] == "notebook"
    assert meta["competition_sources"] == ["vesuvius-challenge-surface-detection"]
    assert (REPO / folder / meta["code_file"]).is_file()
    res = _push(REPO / folder, tmp_path)
    assert res.returncode == 0 and "REACHED-NETWORK" in res.stdout, res.stdout + res.stderr


def test_broken_kernel_metadata_is_caught(tmp_path):
    folder = tmp_path / "k"
    folder.mkdir()
    meta = json.loads((REPO / "kernel-metadata.json").read_text())
    meta["code_file"] = "notebooks/missing.ipynb"
    (folder / "kernel-metadata.json").write_text(json.dumps(meta))
    res = _push(folder, tmp_path)
    assert res.returncode == 3 and "Source file not found" in res.stdout, res.stdout + res.stderr


def test_dataset_metadata():
    for name in ("kaggle-utils-wheels", "vesuvius-surface-models"):
        meta = json.loads((REPO / "datasets" / name / "dataset-metadata.json").read_text())
        assert meta["id"].endswith("/" + name) and meta["title"] == name and meta["licenses"]
    assert "kaggleuser/kaggle-utils-wheels" in json.loads((REPO / "kernel-metadata.json").read_text())["dataset_sources"]


@pytest.mark.slow
def test_wheel_set_installs_offline_into_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    res = subprocess.run(["bash", str(REPO / "scripts" / "build_wheels.sh"), sys.executable, str(wheels)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert {"kaggle_utils", "segmentation_models_pytorch_3d", "timm_3d", "pretrainedmodels",
            "efficientnet_pytorch", "munch", "connected_components_3d", "edt"} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    pkgs = ["kaggle_utils", "segmentation-models-pytorch-3d", "timm-3d", "pretrainedmodels", "efficientnet-pytorch",
            "munch", "connected-components-3d", "edt"]
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels), *pkgs],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    # Stand-in for Kaggle's image: torch, numpy, ... visible from our environment's site-packages,
    # appended after the fresh venv's own (a .pth line), so what the wheels installed takes precedence.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "kaggle_image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = ("import kaggle_utils, kaggle_utils.data, kaggle_utils.cli, segmentation_models_pytorch_3d as smp;"
             "from kaggle_utils.train import load_train_config;"
             "assert load_train_config('kaggle-t4').model.encoder == 'resnet34';"  # configs ship in the wheel
             "print(kaggle_utils.__file__); print(smp.__file__)")
    res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.strip().splitlines()[-2:]
    assert first.startswith(str(venv)) and second.startswith(str(venv)), res.stdout
    shutil.rmtree(venv)
