"""Kaggle packaging: kernel metadata passes the Kaggle CLI's validation offline; the wheel set's check rejects
wheels that cannot install on the target; the cp312 set installs offline on a real Python 3.12 and reads LZW TIFFs.

The rehearsal of a whole Kaggle submission run lives in ``tests/test_kaggle_rehearsal.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
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
    assert meta["machine_shape"] == "NvidiaTeslaT4"  # GPU T4 x2; without it a push may get a P100 torch cannot run
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




# ------------------------------------------------------------------------------------------------
# kaggle-setup / kaggle-push (kaggle_utils.kaggle_cli)


def _repo_copy(tmp_path: Path) -> Path:
    from kaggle_utils.kaggle_cli import METADATA_FILES

    root = tmp_path / "repo"
    for rel in METADATA_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, root / rel)
    return root


def _fake_kaggle(tmp_path: Path, monkeypatch) -> Path:
    """A ``kaggle`` executable first on PATH that records its arguments."""
    bin_dir, log = tmp_path / "bin", tmp_path / "kaggle-calls.txt"
    bin_dir.mkdir()
    (bin_dir / "kaggle").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    (bin_dir / "kaggle").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_the_four_metadata_files_hold_the_placeholder_and_kaggle_setup_replaces_it_everywhere(tmp_path, capsys):
    from kaggle_utils.cli import main
    from kaggle_utils.kaggle_cli import METADATA_FILES

    assert all("kaggleuser/" in (REPO / rel).read_text() for rel in METADATA_FILES)
    root = _repo_copy(tmp_path)
    assert main(["kaggle-setup", "--user", "alice-k", "--root", str(root)]) == 0
    assert "4 of 4 metadata file(s) changed" in capsys.readouterr().out
    for rel in METADATA_FILES:
        text = (root / rel).read_text()
        assert "kaggleuser" not in text and json.loads(text)["id"].startswith("alice-k/"), rel
    assert json.loads((root / "kernel-metadata.json").read_text())["dataset_sources"] == [
        "alice-k/kaggle-utils-wheels", "alice-k/vesuvius-surface-models"]
    assert json.loads((root / "kernel-metadata.json").read_text())["machine_shape"] == "NvidiaTeslaT4"  # kept
    assert main(["kaggle-setup", "--user", "alice-k", "--root", str(root)]) == 0
    assert "0 of 4" in capsys.readouterr().out
    for bad in ("Alice K", "a/b", ""):
        assert main(["kaggle-setup", "--user", bad, "--root", str(root)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: kaggle-setup: --user") and err.count("\n") == 1


def test_kaggle_push_refuses_the_placeholder_and_a_missing_machine_shape(tmp_path, monkeypatch, capsys):
    from kaggle_utils.cli import main

    calls = _fake_kaggle(tmp_path, monkeypatch)
    root = _repo_copy(tmp_path)
    for folder in (root, root / "notebooks" / "train", root / "datasets" / "kaggle-utils-wheels"):
        assert main(["kaggle-push", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "still owned by the placeholder 'kaggleuser'" in err and "kaggle-setup --user" in err
    assert not calls.exists()  # the Kaggle CLI was never run
    assert main(["kaggle-setup", "--user", "alice", "--root", str(root)]) == 0
    meta = json.loads((root / "kernel-metadata.json").read_text())
    del meta["machine_shape"]
    (root / "kernel-metadata.json").write_text(json.dumps(meta))
    assert main(["kaggle-push", str(root)]) == 2
    assert '"machine_shape" is None, expected \'NvidiaTeslaT4\'' in capsys.readouterr().err
    assert not calls.exists()


def test_kaggle_push_runs_the_kaggle_cli_once_the_metadata_is_set(tmp_path, monkeypatch, capsys):
    from kaggle_utils.cli import main

    calls = _fake_kaggle(tmp_path, monkeypatch)
    root = _repo_copy(tmp_path)
    assert main(["kaggle-setup", "--user", "alice", "--root", str(root)]) == 0
    wheels = root / "datasets" / "kaggle-utils-wheels"
    assert main(["kaggle-push", str(root / "notebooks" / "train")]) == 0
    assert main(["kaggle-push", str(wheels)]) == 0
    assert main(["kaggle-push", str(wheels), "-m", "kaggle_utils 1a2b", "--dir-mode", "tar"]) == 0
    assert main(["kaggle-push", str(root), "--dry-run"]) == 0
    assert calls.read_text().splitlines() == [
        f"kernels push -p {root / 'notebooks' / 'train'}",
        f"datasets create -p {wheels}",
        f"datasets version -p {wheels} -m kaggle_utils 1a2b --dir-mode tar",
    ]
    assert capsys.readouterr().out.splitlines()[-1] == f"kaggle kernels push -p {root}"


def test_readme_pushes_through_the_guarded_command():
    """Every push the README tells a user to type goes through kaggle-push (which refuses the placeholder)."""
    readme = (REPO / "README.md").read_text()
    raw = [ln for ln in readme.splitlines() if re.search(r"^\s*kaggle (kernels push|datasets (create|version))", ln)]
    assert not raw, raw
    assert "kaggle_utils kaggle-setup --user" in readme and "kaggle_utils kaggle-push" in readme


# ------------------------------------------------------------------------------------------------
# The wheel set (scripts/build_wheels.py)

def load_build_wheels():
    """``scripts/build_wheels.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("build_wheels", REPO / "scripts" / "build_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_wheels", mod)
    spec.loader.exec_module(mod)
    return mod


def find_python312() -> str | None:
    """A CPython 3.12 interpreter: ``$KU_PY312``, else pyenv's 3.12.x, else ``python3.12`` on PATH."""
    candidates = [os.environ.get("KU_PY312")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += [str(p / "bin" / "python") for p in sorted(Path(root, "versions").glob("3.12*"), reverse=True)]
    candidates.append(shutil.which("python3.12"))
    for c in candidates:
        if c and Path(c).is_file() and subprocess.run([c, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                                      capture_output=True).returncode == 0:
            return c
    return None


def make_fake_wheel(folder: Path, name: str, version: str, tag: str, requires: tuple[str, ...] = (),
                    requires_python: str | None = None) -> Path:
    """A minimal valid wheel ``{name}-{version}-{tag}.whl`` (one module, METADATA, WHEEL, RECORD)."""
    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    if requires_python:
        meta += f"Requires-Python: {requires_python}\n"
    files = {f"{name}.py": "X = 1\n", f"{dist}/METADATA": meta,
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return path


def test_wheel_check_accepts_good_set_and_names_each_wrong_wheel(tmp_path):
    bw = load_build_wheels()
    t312 = bw.Target("3.12")
    good = tmp_path / "good"
    good.mkdir()
    make_fake_wheel(good, "purepkg", "1.0", "py3-none-any", requires=("numpy>=1.24",))
    make_fake_wheel(good, "binpkg", "1.0", "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64")
    make_fake_wheel(good, "abipkg", "1.0", "cp311-abi3-manylinux_2_28_x86_64")
    assert bw.check_wheel_set(good, t312) == []

    # A cp311 wheel in a cp312 set: named by the tag check AND rejected by pip's own dry run.
    wrong_py = tmp_path / "wrong_py"
    shutil.copytree(good, wrong_py)
    make_fake_wheel(wrong_py, "oldpkg", "1.0", "cp311-cp311-manylinux2014_x86_64")
    problems = bw.check_wheel_set(wrong_py, t312)
    assert any(p.startswith("oldpkg-1.0-cp311-cp311-manylinux2014_x86_64.whl: tag") for p in problems), problems
    assert any("pip cannot install" in p and "oldpkg-1.0-cp311" in p for p in problems), problems
    assert bw.check_wheel_set(wrong_py, bw.Target("3.11")) != []  # binpkg is cp312-only

    # In one set: a wrong platform, a numpy pin that excludes the image's, a marker that does not apply on 3.12,
    # a Requires-Python the target fails. Each bad wheel is named; the good ones are not.
    mixed = tmp_path / "mixed"
    shutil.copytree(good, mixed)
    make_fake_wheel(mixed, "macpkg", "2.0", "cp312-cp312-macosx_11_0_arm64")
    make_fake_wheel(mixed, "newnumpy", "2.0", "py3-none-any", requires=("numpy>=2.1",))
    make_fake_wheel(mixed, "oldmarker", "2.0", "py3-none-any", requires=("numpy<2; python_version < '3.12'",))
    make_fake_wheel(mixed, "py313", "2.0", "py3-none-any", requires_python=">=3.13")
    problems = bw.check_wheel_set(mixed, t312)
    text = "\n".join(problems)
    assert "macpkg-2.0-cp312-cp312-macosx_11_0_arm64.whl: tag" in text and "does not install on CPython 3.12" in text
    assert "newnumpy-2.0-py3-none-any.whl: requires numpy>=2.1, Kaggle's image has numpy 2.0.2" in text
    assert "pip cannot install" in text
    assert "oldmarker" not in text and "purepkg" not in text and "abipkg" not in text, text
    py313 = tmp_path / "py313"
    shutil.copytree(good, py313)
    make_fake_wheel(py313, "py313", "2.0", "py3-none-any", requires_python=">=3.13")
    problems = bw.check_wheel_set(py313, t312)
    assert len(problems) == 1 and "pip cannot install" in problems[0] and "py313" in problems[0], problems
    dup = tmp_path / "dup"
    shutil.copytree(good, dup)
    make_fake_wheel(dup, "purepkg", "1.1", "py3-none-any")
    assert any("two wheels of purepkg" in p for p in bw.check_wheel_set(dup, t312))
    assert bw.check_wheel_set(tmp_path / "empty-missing", t312)[0].endswith("no *.whl files")


def test_build_wheels_cli_check_only_gives_one_clear_line(tmp_path):
    make_fake_wheel(tmp_path, "oldpkg", "1.0", "cp311-cp311-manylinux2014_x86_64")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "build_wheels.py"), "--check-only", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "oldpkg-1.0-cp311-cp311-manylinux2014_x86_64.whl: tag" in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "build_wheels.py"), "--check-only",
                          "--python-version", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr.startswith("build_wheels: --python-version: expected MAJOR.MINOR")


def test_default_target_is_kaggles_image():
    bw = load_build_wheels()
    t = bw.Target()
    assert t.python_version == "3.12" and t.abi == "cp312"
    assert {"manylinux2014_x86_64", "manylinux_2_28_x86_64", "manylinux_2_35_x86_64"} <= set(t.platforms)
    assert "cp312-cp312-manylinux_2_24_x86_64" in t.supported_tags()
    assert "cp312-cp312-manylinux_2_39_x86_64" not in t.supported_tags()  # newer glibc than the image's
    assert bw.INSTALL_LINE == "pip install --no-index --no-deps /kaggle/input/kaggle-utils-wheels/*.whl"


EXPECTED_SET = {"kaggle-utils", "segmentation-models-pytorch-3d", "timm-3d", "pretrainedmodels",
                "efficientnet-pytorch", "munch", "dynamic-network-architectures", "six", "connected-components-3d",
                "edt", "imagecodecs"}

_PROBE_312 = """
import io, sys
import numpy as np, tifffile, cc3d, edt, imagecodecs
assert sys.version_info[:2] == (3, 12) and np.__version__.startswith("2.0."), (sys.version, np.__version__)
vol = (np.arange(24 * 20 * 16, dtype=np.int64) % 251).astype(np.uint8).reshape(24, 20, 16)
buf = io.BytesIO()
tifffile.imwrite(buf, vol, compression="lzw")
buf.seek(0)
with tifffile.TiffFile(buf) as tif:
    assert tif.pages[0].compression == 5, tif.pages[0].compression  # LZW
    back = tif.asarray()
assert back.dtype == np.uint8 and np.array_equal(back, vol)
mask = np.zeros((9, 9, 9), bool); mask[1:3, 1:3, 1:3] = True; mask[5:8, 5:8, 5:8] = True
labels, n = cc3d.connected_components(mask, return_N=True)
assert n == 2, n
dist = edt.edt(mask)
assert dist[6, 6, 6] == 2.0 and dist[0, 0, 0] == 0.0, dist[6, 6, 6]
print("OK", np.__version__, tifffile.__version__, imagecodecs.__version__, cc3d.__file__)
"""


@pytest.mark.slow
def test_cp312_wheel_set_installs_and_reads_lzw_on_python312(tmp_path):
    """The set Kaggle gets (cp312) on a real CPython 3.12 with numpy 2.0, installed as the notebooks do.

    torch for 3.12 is a multi-GB CUDA download, so ``kaggle_utils`` itself is not imported here: the rehearsal
    (tests/test_kaggle_rehearsal.py) runs the package; this test proves the compiled wheels and LZW on 3.12."""
    py312 = find_python312()
    if py312 is None:
        pytest.skip("no CPython 3.12 interpreter (set KU_PY312, or install pyenv's 3.12.x)")
    wheels = tmp_path / "kaggle-utils-wheels"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "build_wheels.py"), "--out", str(wheels)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    build_s = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    bw = load_build_wheels()
    infos = bw.describe(wheels)
    assert {i.name for i in infos} == EXPECTED_SET, res.stdout
    for i in infos:
        if i.name in {"connected-components-3d", "edt", "imagecodecs"}:
            assert i.tag.startswith(("cp312-cp312-", "cp311-abi3-", "cp312-abi3-")) and "x86_64" in i.tag, i
        else:
            assert i.tag.endswith("-none-any"), i

    venv = tmp_path / "venv312"
    subprocess.run([py312, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    # What the image already has (numpy 2.0.x, tifffile) comes from PyPI; the set comes only from the folder.
    res = subprocess.run([py, "-m", "pip", "install", "-q", "numpy==2.0.*", "tifffile"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    env = bw._clean_pip_env()
    env.update(PIP_NO_INDEX="1", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    res = subprocess.run(f"{py} -m pip install --no-index --no-deps {wheels}/*.whl", shell=True, capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([py, "-c", _PROBE_312], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("OK 2.0."), res.stdout + res.stderr
    assert str(venv) in res.stdout, res.stdout
    # the pure wheels landed too (not imported: they need torch)
    res = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, timeout=120)
    have = {ln.split("==")[0].lower().replace("_", "-") for ln in res.stdout.split()}
    assert EXPECTED_SET <= have, res.stdout
    print(f"cp312 wheel set built in {build_s:.1f} s:\n" + bw.format_table(infos))


def test_wheel_with_a_stale_module_is_refused(tmp_path):
    """A module deleted from the source (train.py became train/) must not ride along from ./build."""
    import zipfile

    bw = load_build_wheels()
    src = tmp_path / "kaggle_utils"
    (src / "train").mkdir(parents=True)
    for name in ("__init__.py", "train/__init__.py", "train/loop.py"):
        (src / name).write_text("")
    good, stale = tmp_path / "kaggle_utils-0.1.0-py3-none-any.whl", tmp_path / "stale" / "kaggle_utils-0.1.0-py3-none-any.whl"
    stale.parent.mkdir()
    for path, extra in ((good, []), (stale, ["kaggle_utils/train.py"])):
        with zipfile.ZipFile(path, "w") as zf:
            for name in ["kaggle_utils/__init__.py", "kaggle_utils/train/__init__.py", "kaggle_utils/train/loop.py",
                         "kaggle_utils/_version.py", *extra]:
                zf.writestr(name, "")
    bw.check_wheel_matches_source(good, src)
    with pytest.raises(bw.BuildError, match=r"does not match the source tree: extra kaggle_utils/train.py .*stale ./build"):
        bw.check_wheel_matches_source(stale, src)
