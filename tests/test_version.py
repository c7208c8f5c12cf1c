"""Version stamp (kaggle_utils.version): --version, checkpoints, exports and the wheel say which code they come from."""

from __future__ import annotations

import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

import kaggle_utils
from kaggle_utils import version
from kaggle_utils.version import CHECKPOINT_KEY, git_commit, version_stamp

REPO = Path(__file__).resolve().parents[1]
IN_CHECKOUT = git_commit(REPO) is not None and (Path(kaggle_utils.__file__).resolve().parent.parent == REPO)


@pytest.fixture
def fresh_stamp():
    version_stamp.cache_clear()
    yield
    version_stamp.cache_clear()


def test_cli_version_prints_package_version_and_commit(capsys):
    from kaggle_utils.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out == f"kaggle_utils {version_stamp()}\n"
    assert out.startswith(f"kaggle_utils {kaggle_utils.__version__} (commit ")
    if IN_CHECKOUT:
        assert f"(commit {git_commit(REPO)})" in out


def test_stamp_falls_back_from_git_to_the_built_file_to_unknown(fresh_stamp, monkeypatch):
    monkeypatch.setattr(version, "_checkout_commit", lambda: None)  # an installed wheel: no work tree
    monkeypatch.setitem(sys.modules, "kaggle_utils._version", types.SimpleNamespace(COMMIT="abc1234567"))
    assert version_stamp() == f"{kaggle_utils.__version__} (commit abc1234567)"
    version_stamp.cache_clear()
    monkeypatch.setitem(sys.modules, "kaggle_utils._version", None)  # no _version.py: ImportError
    assert version_stamp() == f"{kaggle_utils.__version__} (commit unknown)"


def test_git_commit_is_none_outside_a_work_tree_or_without_git(tmp_path, monkeypatch):
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert git_commit(REPO) is None


def test_every_checkpoint_and_export_carries_the_stamp(tmp_path):
    from kaggle_utils.config import to_dict
    from kaggle_utils.models import ModelConfig, build_model, export_checkpoint, save_checkpoint

    cfg = ModelConfig(arch="ResEncUNet", n_stages=2, features_per_stage=[2, 4])
    ckpt = save_checkpoint(tmp_path / "best.pt", model=build_model(cfg), model_config=to_dict(cfg))
    assert torch.load(ckpt, weights_only=True)[CHECKPOINT_KEY] == version_stamp()
    raw = torch.load(ckpt, weights_only=True)
    raw[CHECKPOINT_KEY] = "0.0.9 (commit old1234)"  # trained by older code
    torch.save(raw, tmp_path / "old.pt")
    exported = torch.load(export_checkpoint(tmp_path / "old.pt", tmp_path / "model.pt"), weights_only=True)
    assert exported["trained_with"] == "0.0.9 (commit old1234)" and exported[CHECKPOINT_KEY] == version_stamp()
    again = torch.load(export_checkpoint(tmp_path / "model.pt", tmp_path / "model2.pt"), weights_only=True)
    assert again["trained_with"] == "0.0.9 (commit old1234)"  # an export of an export keeps the training's


@pytest.mark.slow  # builds the wheel (~10 s)
@pytest.mark.skipif(not IN_CHECKOUT, reason="needs the git checkout the package runs from")
def test_the_wheel_records_the_commit_it_was_built_from(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("kaggle_utils-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read("kaggle_utils/_version.py").decode()
    assert f"COMMIT = {git_commit(REPO)!r}" in text
    assert not (REPO / "kaggle_utils" / "_version.py").exists()  # written into the build, not the checkout
