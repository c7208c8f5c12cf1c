"""Shared fixtures."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest


@pytest.fixture
def no_imagecodecs(monkeypatch):
    """Make tifffile behave as on Kaggle's image, where ``imagecodecs`` is not installed.

    tifffile does ``import imagecodecs`` once at import time and, when that fails, uses its
    pure-Python ``tifffile._imagecodecs`` (zlib, lzma, packbits decode, ..., no LZW); codec lookups
    go through the lazily built ``TIFF.DECOMPRESSORS``/``COMPRESSORS`` maps. This swaps in the
    fallback module, resets those maps and blocks ``import imagecodecs``, then checks that LZW
    really cannot be encoded or decoded any more.
    """
    import tifffile
    from tifffile import _imagecodecs

    tf = tifffile.tifffile
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # `import imagecodecs` raises ImportError
    monkeypatch.setattr(tf, "imagecodecs", _imagecodecs)
    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", tf.CompressionCodec(encode=False))
    monkeypatch.setattr(tifffile.TIFF, "COMPRESSORS", tf.CompressionCodec(encode=True))
    for name in ("PREDICTORS", "UNPREDICTORS"):
        if hasattr(tf, "PredictorCodec"):
            monkeypatch.setattr(tifffile.TIFF, name, tf.PredictorCodec(encode=name == "PREDICTORS"))
    # self-check: the simulation is real
    assert int(tifffile.COMPRESSION.LZW) not in tifffile.TIFF.DECOMPRESSORS
    with pytest.raises(KeyError, match="imagecodecs"):
        tifffile.imwrite(io.BytesIO(), np.zeros((2, 2, 2), np.uint8), compression="lzw")
    yield


@pytest.fixture(scope="session")
def tiny_train_data(tmp_path_factory):
    """A competition-layout folder of synthetic data, made once per test session and shared
    (read-only: copy it before changing anything): 3 training volumes of 64^3 from 3 scrolls (so
    ``train.n_folds: 3`` works) and 1 test volume, seed 0. Used by the training and prediction tests."""
    from kaggle_utils.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("tiny_train_data"), n_train=3, n_test=1, size=64, n_scrolls=3,
                            seed=0)
