"""Both notebooks run headless (papermill) on a tiny synthetic set: train one short epoch, then submit with
that checkpoint; the produced submission.zip passes the validator, the executed notebooks show their figures
and the epoch lines. Also: parameters, the offline install cell and the default checkpoint search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kaggle_utils.submission import validate_submission
from kaggle_utils.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]


def _code_cells(name: str) -> list[dict]:
    nb = json.loads((REPO / "notebooks" / name).read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", ["train.ipynb", "submit.ipynb"])
def test_notebooks_are_clean_and_parameterized(name):
    cells = _code_cells(name)
    assert "parameters" in cells[0].get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"
    for c in cells:
        assert not c.get("outputs") and c.get("execution_count") is None, "outputs must be cleared in git"


@pytest.mark.parametrize("name", ["train.ipynb", "submit.ipynb"])
def test_notebooks_install_every_wheel_from_input_dir(name):
    params = "".join(_code_cells(name)[0]["source"])
    assert 'INPUT_DIR = "/kaggle/input"' in params
    install = "".join(_code_cells(name)[1]["source"])
    assert "INPUT_DIR" in install and "kaggle_utils-*.whl" in install and "*.whl" in install
    assert '"--no-index", "--no-deps"' in install and "--find-links" not in install
    assert "/kaggle/input" not in install  # only through INPUT_DIR


def test_train_notebook_parameters():
    params = "".join(_code_cells("train.ipynb")[0]["source"])
    for name in ("RESUME = False", "GPUS = 1", "TIME_LIMIT_S", "OUT_DIR", "DRY_RUN_STEPS = 5"):
        assert name in params


def test_train_notebook_offers_the_winners_path():
    """Issue 25: TIME_BUDGET and INIT_FROM parameters reach both training calls; FOLD = 'all' is mentioned."""
    params = "".join(_code_cells("train.ipynb")[0]["source"])
    ns: dict = {}
    exec(params, ns)  # the parameters cell is plain assignments
    assert ns["TIME_BUDGET"] is None and ns["INIT_FROM"] is None
    assert "'all'" in params
    calls = "".join("".join(c["source"]) for c in _code_cells("train.ipynb") if "train.train_folds(" in "".join(c["source"]))
    assert calls.count("time_budget=TIME_BUDGET") == 2 and calls.count("init_from=INIT_FROM") == 2


def test_submit_notebook_finds_model_pt_before_best_pt_and_the_last_pt_of_a_fold_all_run(tmp_path):
    from kaggle_utils.models import find_checkpoints

    params = "".join(_code_cells("submit.ipynb")[0]["source"])
    ns: dict = {}
    exec(params, ns)  # the parameters cell is plain assignments
    for f in ("models-a/fold0/model.pt", "models-a/fold0/best.pt", "models-a/fold1/best.pt",
              "run/fold2/last.pt", "wheels/kaggle_utils-0.1.0-py3-none-any.whl"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"x")
    found = find_checkpoints(tmp_path, ns["CHECKPOINT_NAMES"])
    assert found == [str(tmp_path / "models-a/fold0/model.pt"), str(tmp_path / "models-a/fold1/best.pt")]
    # the winners' path: a finished --fold all run has last.pt and no best.pt; a fold run's last.pt never counts
    (tmp_path / "run/fold2/result.json").write_text('{"fold": 2, "best_epoch": 7}')
    (tmp_path / "full/last.pt").parent.mkdir()
    (tmp_path / "full/last.pt").write_bytes(b"x")
    assert find_checkpoints(tmp_path, ns["CHECKPOINT_NAMES"]) == found  # unfinished: no result.json yet
    (tmp_path / "full/result.json").write_text('{"fold": "all", "best_epoch": null}')
    assert find_checkpoints(tmp_path, ns["CHECKPOINT_NAMES"]) == sorted(found + [str(tmp_path / "full/last.pt")])
    assert find_checkpoints(tmp_path / "missing", ns["CHECKPOINT_NAMES"]) == []


def _outputs(path: Path) -> tuple[list[str], str]:
    """(mime types of the display outputs, all stream text) of an executed notebook, per code cell in order."""
    nb = json.loads(path.read_text())
    mimes, text = [], []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                text.append("".join(out["text"]))
            elif "data" in out:
                mimes.extend(out["data"])
    return mimes, "".join(text)


@pytest.mark.slow
def test_train_then_submit_notebooks(tmp_path):
    papermill = pytest.importorskip("papermill")
    data = generate_dataset(tmp_path / "data", n_train=6, n_test=2, size=64, n_scrolls=3, seed=0)
    run = tmp_path / "run"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "train.ipynb"), str(tmp_path / "train.out.ipynb"), cwd=str(REPO),
        parameters={"DATA_DIR": str(data), "CONFIG": "smoke-cpu", "FOLD": 0, "EPOCHS": 1,
                    "SMOKE": True, "OUT_DIR": str(run), "TIME_LIMIT_S": 1800, "INPUT_DIR": str(tmp_path / "input")},
        progress_bar=False, kernel_name="python3",
    )
    ckpt = run / "fold0" / "best.pt"
    assert ckpt.exists()
    mimes, text = _outputs(tmp_path / "train.out.ipynb")
    # figures: the data montage, the training curves, the out-of-fold diagnose figure
    assert mimes.count("image/png") >= 3, mimes
    # the run's log lines reach the notebook: device, the epoch line with its parts, the end of the fold
    assert "fold 0: device cpu" in text and "finished (completed)" in text, text[-3000:]
    # the dry run shows what a step costs before training starts
    assert "dry run of smoke-cpu on cpu" in text and "s/step (median)" in text and "peak memory" in text, text[:3000]
    assert text.index("dry run of") < text.index("epoch 1/1 loss")
    assert text.count("epoch 1/1 loss") == 1 and "val dice" in text and "labelled" in text, text[-3000:]
    out = tmp_path / "submission.zip"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "submit.ipynb"), str(tmp_path / "submit.out.ipynb"), cwd=str(REPO),
        parameters={"DATA_DIR": str(data), "CHECKPOINTS": [str(ckpt)], "OUT": str(out), "DEVICE": "cpu",
                    "REPORT_PNG": str(tmp_path / "submission_report.png"), "INPUT_DIR": str(tmp_path / "input")},
        progress_bar=False, kernel_name="python3",
    )
    assert out.exists()
    assert validate_submission(out, data) == []
    assert (tmp_path / "submission_report.png").stat().st_size > 10000
    assert not (REPO / "submission_report.png").exists(), "the notebook wrote into the repository"
    mimes, _ = _outputs(tmp_path / "submit.out.ipynb")
    assert "image/png" in mimes, mimes  # the foreground histogram
