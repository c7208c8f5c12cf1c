"""Baselines: known answers on a tiny volume and a valid baseline submission."""

from __future__ import annotations

import numpy as np
import pytest

from kaggle_utils import cli
from kaggle_utils.baselines import baseline_prediction
from kaggle_utils.submission import validate_submission
from kaggle_utils.synthetic import generate_dataset


def test_baseline_known_answers():
    image = np.full((4, 6, 6), 20, np.uint8)
    image[1:3, 2:4, 2:4] = 200
    assert baseline_prediction(image, "zeros").sum() == 0
    otsu = baseline_prediction(image, "otsu")
    assert otsu.dtype == np.uint8 and otsu.sum() == 8 and otsu[1:3, 2:4, 2:4].all()
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_prediction(image, "median")


def test_baseline_cli_writes_valid_submission(tmp_path, capsys):
    root = generate_dataset(tmp_path / "d", n_train=1, n_test=2, size=32, n_scrolls=1, seed=1)
    for kind in ("zeros", "otsu"):
        out = tmp_path / f"{kind}.zip"
        assert cli.main(["baseline", "--kind", kind, "--data-dir", str(root), "--out", str(out)]) == 0
        assert validate_submission(out, root) == []
