"""Both notebooks run headless (papermill) on a tiny synthetic set: train one short epoch, then submit with
that checkpoint; the produced submission.zip passes the validator."""

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


@pytest.mark.slow
def test_train_then_submit_notebooks(tmp_path):
    papermill = pytest.importorskip("papermill")
    data = generate_dataset(tmp_path / "data", n_train=6, n_test=2, size=64, n_scrolls=3, seed=0)
    run = tmp_path / "run"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "train.ipynb"), str(tmp_path / "train.out.ipynb"), cwd=str(REPO),
        parameters={"DATA_DIR": str(data), "CONFIG": "configs/smoke-cpu.yaml", "FOLD": 0, "EPOCHS": 1,
                    "SMOKE": True, "OUT_DIR": str(run), "TIME_LIMIT_S": 1800},
        progress_bar=False, kernel_name="python3",
    )
    ckpt = run / "fold0" / "best.pt"
    assert ckpt.exists()
    out = tmp_path / "submission.zip"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "submit.ipynb"), str(tmp_path / "submit.out.ipynb"), cwd=str(REPO),
        parameters={"DATA_DIR": str(data), "CHECKPOINTS": [str(ckpt)], "OUT": str(out), "DEVICE": "cpu",
                    "REPORT_PNG": str(tmp_path / "submission_report.png")},
        progress_bar=False, kernel_name="python3",
    )
    assert out.exists()
    assert validate_submission(out, data) == []
    assert (tmp_path / "submission_report.png").stat().st_size > 10000
    assert not (REPO / "submission_report.png").exists(), "the notebook wrote into the repository"
