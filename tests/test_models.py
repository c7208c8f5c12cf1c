"""Tests for kaggle_utils.models: config validation, patch-size checks, building, checkpoints."""

import warnings

import pytest
import torch

from kaggle_utils.config import ConfigError, from_dict
from kaggle_utils.models import (
    ARCHITECTURES,
    KNOWN_ENCODERS,
    ModelConfig,
    build_model,
    load_checkpoint,
    save_checkpoint,
    validate_patch_size,
)

warnings.filterwarnings("ignore", category=FutureWarning)

TINY = dict(encoder="resnet18", decoder_channels=[16, 16, 8, 8, 4])


def test_validate_patch_size_accepts_multiples_of_32():
    assert validate_patch_size(64) == (64, 64, 64)
    assert validate_patch_size([32, 64, 128]) == (32, 64, 128)


@pytest.mark.parametrize("shape", [(48, 64, 64), 100, (64, 64, 0), (64, 64)])
def test_validate_patch_size_rejects_with_clear_message(shape):
    with pytest.raises(ValueError, match="patch_size"):
        validate_patch_size(shape)


def test_validate_patch_size_message_names_axis_and_fix():
    with pytest.raises(ValueError) as exc:
        validate_patch_size((64, 48, 64), name="sampler.patch_size")
    msg = str(exc.value)
    assert "sampler.patch_size" in msg and "y=48" in msg and "32" in msg and "64" in msg


def test_unknown_encoder_lists_known_ones():
    with pytest.raises(ValueError) as exc:
        ModelConfig(encoder="resnet1000")
    assert "resnet1000" in str(exc.value) and "resnet34" in str(exc.value)


def test_unknown_arch_and_key_via_from_dict():
    with pytest.raises(ConfigError, match="model.*arch"):
        from_dict(ModelConfig, {"arch": "Segformer"}, "model")
    with pytest.raises(ConfigError, match="model.encodr"):
        from_dict(ModelConfig, {"encodr": "resnet18"}, "model")


def test_known_lists_are_nonempty():
    assert "Unet" in ARCHITECTURES and "resnet18" in KNOWN_ENCODERS


def test_build_model_shapes():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    y = model(torch.randn(2, 1, 32, 32, 64))
    assert y.shape == (2, 1, 32, 32, 64) and y.dtype == torch.float32


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = build_model(cfg).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    path = save_checkpoint(tmp_path / "a.pt", model=model, model_config={**cfg.__dict__}, epoch=3,
                           config={"model": {**cfg.__dict__}}, rng=torch.get_rng_state())
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporary file left
    loaded, cfg_dict, ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and cfg_dict["model"]["encoder"] == "resnet18"
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_weights_path_loads_local_file(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(**TINY)
    model = build_model(cfg)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(2)
    other = build_model(ModelConfig(**TINY, weights_path=str(tmp_path / "w.pt")))
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="weights_path"):
        build_model(ModelConfig(**TINY, weights_path=str(tmp_path / "missing.pt")))


def test_load_checkpoint_rejects_foreign_file(tmp_path):
    torch.save({"foo": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a kaggle_utils checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
