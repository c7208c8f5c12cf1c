"""Tests for kaggle_utils.predict: one inference path (train's out-of-fold probabilities equal
``predict --save-probs``) and predict's faults (bad checkpoints, bad --out, unreadable or 4D test
images, signals, a missing GPU), each a one-line message, and the CLI never shows a traceback."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore", category=FutureWarning)

# A tiny run: 32^3 windows over 64^3 synthetic volumes, one epoch, a thin decoder.
TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 4]},
    "loss": {"name": "default"},
    "sampler": {"patch_size": [32, 32, 32], "patches_per_epoch": 4, "surface_share": 0.7},
    "augment": {"p_affine": 0.0, "p_blur": 0.0},
    "optim": {"lr": 0.002, "warmup_epochs": 1},
    "train": {"epochs": 1, "batch_size": 2, "num_workers": 0, "seed": 3, "n_folds": 3},
    "validation": {"every": 1, "n_volumes": 1, "n_score": 0, "patch_size": [32, 32, 32], "batch_size": 2,
                   "overlap": 0.0},
    "inference": {"patch_size": [32, 32, 32], "overlap": 0.0, "ensemble": "logits", "tta": "rot90"},
    "postprocess": {"threshold": 0.5},
}


def _test_set_of(data_dir: Path, ids: list[str], dst: Path) -> Path:
    """A competition folder whose test set is the train volumes ``ids`` of ``data_dir``."""
    rows = {r["id"]: r for r in csv.DictReader((data_dir / "train.csv").open())}
    (dst / "test_images").mkdir(parents=True)
    (dst / "test.csv").write_text("id,scroll_id\n" + "".join(f"{i},{rows[i]['scroll_id']}\n" for i in ids))
    for i in ids:
        shutil.copy(data_dir / "train_images" / f"{i}.tif", dst / "test_images" / f"{i}.tif")
    return dst


@pytest.mark.slow
def test_oof_probabilities_equal_predict_save_probs(tmp_path):
    """``ensemble: logits`` with rot90 TTA: train used to drop ``ensemble`` for its out-of-fold
    probabilities (max |diff| 0.0005 on this tiny model), so tune saw other probabilities than predict."""
    from kaggle_utils.cli import main
    from kaggle_utils.config import from_dict
    from kaggle_utils.synthetic import generate_dataset
    from kaggle_utils.train import TrainConfig, train

    data = generate_dataset(tmp_path / "syn", n_train=3, n_test=1, size=64, n_scrolls=3, seed=0)
    cfg = from_dict(TrainConfig, json.loads(json.dumps(TINY)))
    train(cfg, data, tmp_path / "run", fold=0, device="cpu", progress=False, verbose=False)
    oof = sorted((tmp_path / "run" / "oof").glob("*.npy"))
    assert oof
    test = _test_set_of(data, [p.stem for p in oof], tmp_path / "test")
    rc = main(["predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data-dir", str(test),
               "--out", str(tmp_path / "s.zip"), "--device", "cpu", "--save-probs", str(tmp_path / "probs"), "--json"])
    assert rc == 0
    for npy in oof:
        a, b = np.load(npy), np.load(tmp_path / "probs" / npy.name)
        assert a.dtype == b.dtype == np.float16
        np.testing.assert_array_equal(a, b)
