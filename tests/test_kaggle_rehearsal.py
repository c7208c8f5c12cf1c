"""Rehearsal of a Kaggle submission run: the submit notebook, executed by papermill in a fresh environment that
holds only what Kaggle's image holds, installs the wheel set from a read-only ``kaggle/input`` tree offline,
predicts the synthetic test set with a checkpoint from another read-only input and writes a valid submission.

Two stand-ins for the image:

* default: a fresh venv of this Python that sees this environment's site-packages through a folder of symlinks
  (one ``.pth`` line), minus everything Kaggle's image lacks (:data:`NOT_IN_IMAGE`: imagecodecs, cc3d, edt,
  smp-3d and its pins, munch, monai, kaggle_utils ...); the wheel set is built for this Python.
* ``KU_IMAGE_PYTHON=/path/to/python``: a Python whose environment already holds the image's packages (torch,
  numpy 2.0, timm, ipykernel ...); the venv is made with ``--system-site-packages`` (plus that environment's
  site-packages when it is itself a venv) and the wheel set is built for that Python's version (cp312 for
  Kaggle's current image).

Offline: proxies point at 127.0.0.1:9, ``PIP_NO_INDEX=1`` and no pip configuration. Read-only: the input tree
is ``chmod -R a-w`` and, because root ignores that, its listing, mtimes and hashes are compared after the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from kaggle_utils.submission import validate_submission

REPO = Path(__file__).resolve().parents[1]
COMPETITION = "vesuvius-challenge-surface-detection"
WHEELS = "kaggle-utils-wheels"
MODELS = "vesuvius-surface-models"
KERNEL = "ku-kaggle-rehearsal"
SUBMIT_NOTEBOOK = REPO / "notebooks" / "submit.ipynb"
#: Top-level names (import names and distribution names, lower case, ``-`` as ``_``) that Kaggle's image lacks.
NOT_IN_IMAGE = frozenset({
    "imagecodecs", "cc3d", "connected_components_3d", "edt", "segmentation_models_pytorch_3d", "timm_3d",
    "pretrainedmodels", "efficientnet_pytorch", "munch", "kaggle_utils", "monai", "dynamic_network_architectures",
    "nnunetv2",
})
OFFLINE_ENV = {
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": "",
    "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def _top_name(entry: str) -> str:
    """``edt.cpython-311-x86_64-linux-gnu.so`` / ``edt-3.1.2.dist-info`` -> ``edt``."""
    return re.split(r"[-.]", entry, maxsplit=1)[0].lower().replace("-", "_")


def make_image_standin(venv: Path, site_src: Path, links: Path) -> None:
    """A venv at ``venv`` that sees every entry of ``site_src`` except :data:`NOT_IN_IMAGE` (and editable
    installs), through symlinks in ``links`` listed by a ``.pth`` file (after the venv's own site-packages)."""
    links.mkdir(parents=True)
    for entry in sorted(os.listdir(site_src)):
        if _top_name(entry) in NOT_IN_IMAGE or entry.startswith(("__editable__", "_kaggle_utils")) or \
                entry.endswith(".pth") or entry == "__pycache__":
            continue
        (links / entry).symlink_to(site_src / entry)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    (Path(_venv_purelib(venv)) / "kaggle_image_standin.pth").write_text(f"{links}\n")


def make_image_venv(venv: Path, image_python: str) -> None:
    """A venv of ``image_python`` that sees that interpreter's whole environment: ``--system-site-packages``
    for a system Python, plus its site-packages added by a ``.pth`` (``site.addsitedir``, so its own ``.pth``
    files work) for when ``image_python`` is itself a venv, whose packages ``--system-site-packages`` would miss."""
    sites = json.loads(subprocess.run(
        [image_python, "-c", "import json, site, sysconfig; print(json.dumps([*site.getsitepackages(), "
                             "sysconfig.get_paths()['purelib']]))"],
        capture_output=True, text=True, check=True, timeout=120).stdout)
    subprocess.run([image_python, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    lines = [f"import site; site.addsitedir({d!r})" for d in dict.fromkeys(sites) if Path(d).is_dir()]
    (Path(_venv_purelib(venv)) / "kaggle_image.pth").write_text("\n".join(lines) + "\n")


def _venv_purelib(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _py(venv: Path, code: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: (kind, size, mtime_ns, sha256 of files) — to prove nothing wrote there."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            state[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return state


def _chmod_tree(root: Path, writable: bool) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = Path(dirpath) / name if name else Path(dirpath)
            mode = p.stat().st_mode
            p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_tiny_checkpoint(path: Path) -> Path:
    """A checkpoint as train writes it (``model``, ``model_config``, ``config``, ``epoch``) of the smoke-cpu
    network with its initial weights: the fastest checkpoint the submit path accepts."""
    import torch

    from kaggle_utils.config import to_dict
    from kaggle_utils.models import build_model, save_checkpoint
    from kaggle_utils.train import load_train_config

    cfg = load_train_config("smoke-cpu")
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, model=build_model(cfg.model), model_config=to_dict(cfg.model), config=to_dict(cfg),
                           epoch=0, fold=0, metrics={})


def _image_python() -> str | None:
    return os.environ.get("KU_IMAGE_PYTHON") or None


@pytest.mark.slow
@pytest.mark.parametrize("image", ["standin", "kaggle-image"])
def test_submit_notebook_rehearses_a_kaggle_run(image, tmp_path, monkeypatch):
    """``standin``: this Python minus what the image lacks; ``kaggle-image``: ``KU_IMAGE_PYTHON`` (Python 3.12 with
    the image's torch, made by ``scripts/kaggle_image_env.sh``; ``.ci/run`` sets it), skipped when unset."""
    papermill = pytest.importorskip("papermill")
    t_start = time.perf_counter()
    image_python = _image_python() if image == "kaggle-image" else None
    if image == "kaggle-image" and not image_python:
        pytest.skip("KU_IMAGE_PYTHON is not set (bash scripts/kaggle_image_env.sh builds a Python 3.12 image stand-in)")
    venv = tmp_path / "image-venv"
    if image_python:
        probe = subprocess.run([image_python, "-c", "import sys, torch, ipykernel; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"KU_IMAGE_PYTHON={image_python}: cannot import torch and ipykernel there: "
                        f"{probe.stderr.strip().splitlines()[-1:]}")
        target = probe.stdout.strip()
        make_image_venv(venv, image_python)
    else:
        target = "%d.%d" % sys.version_info[:2]
        make_image_standin(venv, Path(sysconfig.get_paths()["purelib"]), tmp_path / "image-site")

    # The image lacks the set's packages before the install (else the rehearsal proves nothing).
    res = _py(venv, "import torch, numpy, tifffile, ipykernel\n"
                    "for m in ('imagecodecs', 'cc3d', 'edt', 'kaggle_utils', 'segmentation_models_pytorch_3d'):\n"
                    "    try:\n        __import__(m)\n    except ImportError:\n        continue\n"
                    "    raise SystemExit('already importable: ' + m)\n", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr

    # /kaggle/input: competition data (LZW TIFFs), the wheel set for the image's Python, a checkpoint.
    inp = tmp_path / "kaggle" / "input"
    data = inp / COMPETITION
    res = subprocess.run([sys.executable, "-m", "kaggle_utils", "synth", "--out", str(data), "--n-train", "4",
                          "--n-test", "2", "--size", "64", "--n-scrolls", "2", "--seed", "0"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    import tifffile
    with tifffile.TiffFile(next((data / "test_images").glob("*.tif"))) as tif:
        assert tif.pages[0].compression == 5, "synthetic test images must be LZW like the competition's"
    wheels = inp / WHEELS
    wheels.mkdir(parents=True)
    for name in ("README.md", "dataset-metadata.json"):  # as uploaded: not only wheels in the folder
        shutil.copy(REPO / "datasets" / WHEELS / name, wheels / name)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "build_wheels.py"), "--python-version", target,
                          "--out", str(wheels)], capture_output=True, text=True, timeout=900)
    build_s = time.perf_counter() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    ckpt = make_tiny_checkpoint(inp / MODELS / "fold0" / "best.pt")
    (inp / MODELS / "dataset-metadata.json").write_text(
        (REPO / "datasets" / MODELS / "dataset-metadata.json").read_text())

    work = tmp_path / "kaggle" / "working"
    work.mkdir()
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "ipykernel", "install", "--prefix", str(venv),
                          "--name", KERNEL, "--display-name", "Kaggle rehearsal"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr

    # The kernel inherits this environment: offline, no pip configuration, nothing from the repository.
    for key in [k for k in os.environ if k.startswith("PIP_")] + ["PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"]:
        monkeypatch.delenv(key, raising=False)
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("JUPYTER_PATH", str(venv / "share" / "jupyter"))

    before = tree_state(inp)
    _chmod_tree(inp, writable=False)
    out_nb = tmp_path / "submit.out.ipynb"
    out_zip = work / "submission.zip"
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(SUBMIT_NOTEBOOK), str(out_nb), cwd=str(work), kernel_name=KERNEL,
            # CHECKPOINTS=None: the notebook finds the checkpoint under INPUT_DIR, as on Kaggle
            parameters={"INPUT_DIR": str(inp), "DATA_DIR": str(data), "CHECKPOINTS": None, "OUT": str(out_zip),
                        "DEVICE": "cpu", "REPORT_PNG": str(work / "submission_report.png")},
            progress_bar=False,
        )
    except papermill.PapermillExecutionError as exc:
        pytest.fail(f"{SUBMIT_NOTEBOOK.name} failed in the rehearsal at cell {exc.exec_count}: {exc.ename}: "
                    f"{exc.evalue} (executed notebook: {out_nb})", pytrace=False)
    finally:
        notebook_s = time.perf_counter() - t0
        _chmod_tree(inp, writable=True)
    assert tree_state(inp) == before, "the run wrote into the read-only input tree"

    assert validate_submission(out_zip, data) == []
    nb = json.loads(out_nb.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure in the executed notebook"
    printed = "".join("".join(o.get("text", "")) for o in outputs)
    assert str(ckpt) in printed, "the notebook did not use the checkpoint of the model dataset"

    # What the notebook imported came from the wheel set installed into the image's environment.
    res = _py(venv, "import kaggle_utils, imagecodecs, cc3d, edt, segmentation_models_pytorch_3d as smp\n"
                    "from kaggle_utils.train import load_train_config\n"
                    "assert load_train_config('kaggle-t4').model.encoder == 'resnet34'\n"
                    "import sys, numpy, torch\n"
                    "print(kaggle_utils.__file__); print(smp.__file__)\n"
                    "print('Python %d.%d.%d' % sys.version_info[:3], 'torch', torch.__version__, 'numpy', "
                    "numpy.__version__, file=sys.stderr)", cwd=work)
    assert res.returncode == 0, res.stderr
    for line in res.stdout.split():
        assert line.startswith(str(venv)), res.stdout
    print(f"rehearsal ({'KU_IMAGE_PYTHON=' + image_python if image_python else 'stand-in'}, {res.stderr.strip()}): "
          f"wheel set {build_s:.1f} s, notebook {notebook_s:.1f} s, total {time.perf_counter() - t_start:.1f} s")
