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


# ----------------------------------------------------------------------------------------------
# nnU-Net networks (dynamic-network-architectures)
# ----------------------------------------------------------------------------------------------

from kaggle_utils.models import NNUNET_PRESETS, NNUNet, model_divisor, set_deep_supervision  # noqa: E402


@pytest.mark.slow
def test_resenc_m_builds_at_full_size_with_nnunet_settings():
    cfg = ModelConfig(arch="ResEncUNet", preset="resenc-m")
    full = build_model(cfg)
    assert 90e6 < sum(p.numel() for p in full.parameters()) < 110e6  # nnU-Net ResEnc M: ~102 M parameters
    norms = [m for m in full.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine and m.eps == 1e-5 for m in norms)
    assert all(m.negative_slope == 0.01 for m in full.modules() if isinstance(m, torch.nn.LeakyReLU))
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(m.bias is not None for m in convs if m.kernel_size == (3, 3, 3))


@pytest.mark.parametrize(
    "preset",
    # resenc-xl has 7 stages, so its tiny variant still needs a 64^3 patch: ~50 s on 2 cores, slow lane
    [pytest.param(p, marks=pytest.mark.slow) if p == "resenc-xl" else p for p in sorted(NNUNET_PRESETS)],
)
def test_nnunet_preset_and_a_tiny_variant_trains_a_step(preset):
    plan = NNUNET_PRESETS[preset]
    cfg = ModelConfig(arch=plan["arch"], preset=preset)
    assert cfg.n_stages == plan["n_stages"] and cfg.features_per_stage == plan["features_per_stage"]
    assert model_divisor(cfg) == 2 ** (plan["n_stages"] - 1)
    assert plan["patch_size"] % model_divisor(cfg) == 0
    # the same stage structure with 4..16 channels trains a step on a patch of twice the divisor
    tiny = ModelConfig(arch=plan["arch"], preset=preset,
                       features_per_stage=[min(8, 2 * 2 ** k) for k in range(plan["n_stages"])])
    model = build_model(tiny)
    set_deep_supervision(model, True)
    model.train()
    edge = model_divisor(tiny)  # x twice as long: instance norm needs more than one voxel at the bottleneck
    x = torch.randn(1, 1, edge, edge, 2 * edge)
    outs = model(x)
    assert len(outs) == plan["n_stages"] - 1 and outs[0].shape == (1, 1, edge, edge, 2 * edge)
    assert [o.shape[-3] for o in outs] == [edge // 2 ** k for k in range(plan["n_stages"] - 1)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    sum(o.float().mean() for o in outs).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (1, 1, edge, edge, 2 * edge)  # evaluation: full resolution only


def test_nnunet_fields_override_the_preset_and_are_checked():
    cfg = ModelConfig(arch="ResEncUNet", n_stages=4, features_per_stage=[4, 8, 16, 16])
    assert cfg.strides == [1, 2, 2, 2] and cfg.n_blocks_per_stage == [1, 3, 4, 6]
    assert cfg.n_conv_per_stage_decoder == [1, 1, 1] and model_divisor(cfg) == 8
    with pytest.raises(ValueError, match="model.n_blocks_per_stage: needs 4 values"):
        ModelConfig(arch="ResEncUNet", n_stages=4, n_blocks_per_stage=[1, 1])
    with pytest.raises(ValueError, match="model.preset: unknown preset 'resenc-q'"):
        ModelConfig(arch="ResEncUNet", preset="resenc-q")
    with pytest.raises(ValueError, match="PlainConvUNet preset"):
        ModelConfig(arch="ResEncUNet", preset="plain-m")
    with pytest.raises(ValueError, match="model.preset"):
        ModelConfig(arch="Unet", preset="resenc-m")


def test_patch_size_checked_against_the_real_divisor():
    from kaggle_utils.train import TrainConfig

    xl = {"model": {"arch": "ResEncUNet", "preset": "resenc-xl"}, "sampler": {"patch_size": [96, 96, 96]},
          "inference": {"patch_size": [128, 128, 128]}}
    with pytest.raises(ConfigError, match="sampler.patch_size: every edge must be a positive multiple of 64"):
        from_dict(TrainConfig, xl)
    xl["sampler"]["patch_size"] = [64, 128, 64]
    assert list(from_dict(TrainConfig, xl).sampler.patch_size) == [64, 128, 64]


def test_resenc_patch_with_a_1x1x1_bottleneck_is_a_config_error_naming_the_smallest_patch():
    """resenc-m downsamples 32x: a 32^3 patch leaves 1x1x1, where InstanceNorm raises (train and eval)."""
    from kaggle_utils.train import TrainConfig

    cfg = {"model": {"arch": "ResEncUNet", "preset": "resenc-m"}, "sampler": {"patch_size": [32, 32, 32]},
           "inference": {"patch_size": [128, 128, 128]}}
    with pytest.raises(ConfigError, match=r"sampler.patch_size: \[32, 32, 32\] leaves a 1x1x1 feature map .*64\^3"):
        from_dict(TrainConfig, cfg)
    cfg["sampler"]["patch_size"], cfg["inference"]["patch_size"] = [64, 32, 32], [32, 32, 32]
    with pytest.raises(ConfigError, match="inference.patch_size"):
        from_dict(TrainConfig, cfg)
    cfg["inference"]["patch_size"] = [64, 64, 64]
    assert list(from_dict(TrainConfig, cfg).sampler.patch_size) == [64, 32, 32]  # 2x1x1: InstanceNorm is fine
    smp = {"model": dict(TINY), "sampler": {"patch_size": [32, 32, 32]}, "inference": {"patch_size": [32, 32, 32]}}
    assert from_dict(TrainConfig, smp).sampler.patch_size  # BatchNorm pools over the batch: 32^3 stays allowed
    smp["train"] = {"batch_size": 1}  # ... except with one patch per batch
    with pytest.raises(ConfigError, match=r"sampler.patch_size: \[32, 32, 32\] leaves a 1x1x1 .*BatchNorm at batch"):
        from_dict(TrainConfig, smp)


def test_the_smallest_accepted_patch_runs_and_the_rejected_one_does_not():
    """The rule matches the network: 2x1x1 at the bottleneck runs, 1x1x1 raises in InstanceNorm."""
    cfg = ModelConfig(arch="ResEncUNet", n_stages=3, features_per_stage=[4, 8, 8])
    model = build_model(cfg).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 8, 4, 4))
        with pytest.raises(ValueError, match="spatial element"):
            model(torch.randn(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"p: \[4, 4, 4\] leaves a 1x1x1 .* smallest cube that works is 8\^3"):
        validate_patch_size((4, 4, 4), 4, "p", 2)
    assert validate_patch_size((8, 4, 4), 4, "p", 2) == (8, 4, 4)


def test_resenc_checkpoint_and_export_rebuild_from_the_file_alone(tmp_path):
    from kaggle_utils.config import to_dict
    from kaggle_utils.models import export_checkpoint

    cfg = ModelConfig(arch="ResEncUNet", n_stages=3, features_per_stage=[4, 8, 8])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "best.pt", model=model, model_config=to_dict(cfg), config={"model": to_dict(cfg)})
    saved = torch.load(tmp_path / "best.pt", weights_only=True)["model_config"]
    assert saved["n_blocks_per_stage"] == [1, 3, 4] and saved["strides"] == [1, 2, 2]  # preset resolved
    x = torch.randn(1, 1, 16, 16, 16)
    for path in (tmp_path / "best.pt", export_checkpoint(tmp_path / "best.pt", tmp_path / "model.pt")):
        loaded, _, _ = load_checkpoint(path)
        assert isinstance(loaded, NNUNet)
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-6)
