"""Trivial baseline predictions: what a trained model has to beat.

``"zeros"`` predicts no surface at all; ``"otsu"`` marks every voxel brighter than the volume's
Otsu threshold (sheets are brighter than air in CT). Scored with the local competition scorer they
give the floor against which ``make demo`` and a user's first runs are compared.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import load_index, read_volume

__all__ = ["BASELINES", "baseline_prediction", "write_baseline_submission"]

BASELINES = ("zeros", "otsu")


def baseline_prediction(image: np.ndarray, kind: str = "otsu") -> np.ndarray:
    """Baseline mask of a ``uint8 (Z,Y,X)`` CT volume.

    Returns:
        ``uint8 (Z,Y,X)`` in {0, 1}.
    """
    if kind == "zeros":
        return np.zeros(image.shape, np.uint8)
    if kind == "otsu":
        from skimage.filters import threshold_otsu

        return (image > threshold_otsu(image)).astype(np.uint8)
    raise ValueError(f"unknown baseline {kind!r}; choose from {list(BASELINES)}")


def write_baseline_submission(data_dir: str | os.PathLike, out_zip: str | os.PathLike, kind: str = "otsu") -> Path:
    """Write ``submission.zip`` of a baseline for every id of ``test.csv`` (atomic, one volume at a time).

    Raises:
        OutputPathError: ``out_zip`` is a folder or cannot be written (checked before any volume is read).
        DataError: ``data_dir`` or a test image is unreadable (the message names the file).
    """
    from .submission import check_out_zip, write_submission

    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose from {list(BASELINES)}")
    check_out_zip(out_zip)
    index = load_index(data_dir, "test")

    def items() -> Iterator[tuple[str, np.ndarray]]:
        for rec in index:
            yield rec.id, baseline_prediction(read_volume(rec.image_path), kind)

    return write_submission(items(), out_zip)
