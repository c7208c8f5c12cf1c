"""Tests for kaggle_utils.config: the one YAML loader, config-path resolution, key aliases, one
prefix per message, and the one mixed-precision vocabulary of ``train.amp`` / ``inference.amp``."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import pytest
import torch

from kaggle_utils.config import (
    SHIPPED_CONFIG_DIR,
    ConfigDeprecationWarning,
    ConfigError,
    canonical_dict,
    from_dict,
    load_config,
    resolve_config_path,
    save_config,
    shipped_configs,
    to_dict,
)
from kaggle_utils.inference import AMP_MODES, InferenceConfig, normalize_amp, resolve_amp_dtype
from kaggle_utils.postprocess import PostprocessConfig, load_postprocess
from kaggle_utils.train_config import LoopConfig, TrainConfig, load_train_config
from kaggle_utils.tune import SearchSpace, load_search_space

# ---------------------------------------------------------------------------------- resolution


def test_shipped_names_resolve_without_a_folder_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(shipped_configs()) >= {"kaggle-t4", "smoke-cpu", "demo-cpu", "seed-v1", "seed-v2"}
    for name in ("kaggle-t4", "kaggle-t4.yaml"):
        assert resolve_config_path(name) == SHIPPED_CONFIG_DIR / "kaggle-t4.yaml"
    # a path with a folder is that file, never the shipped copy of the same name
    for missing in ("configs/kaggle-t4.yaml", "./kaggle-t4.yaml", str(tmp_path / "kaggle-t4.yaml")):
        with pytest.raises(ConfigError, match="config file not found") as exc:
            resolve_config_path(missing)
        assert str(exc.value).startswith(missing + ":")
    # a bare name that is neither a file nor shipped: the message lists the shipped names
    with pytest.raises(ConfigError, match=r"^kaggle-t5: .*not a shipped config name \(.*kaggle-t4"):
        resolve_config_path("kaggle-t5")
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_config_path(tmp_path)


def test_an_existing_file_wins_over_the_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("kaggle-t4.yaml").write_text("train: {epochs: 7}\n")
    assert resolve_config_path("kaggle-t4.yaml") == Path("kaggle-t4.yaml")
    assert load_train_config("kaggle-t4.yaml").train.epochs == 7  # the user's edited copy, not the wheel's
    assert load_train_config("kaggle-t4").train.epochs != 7  # without suffix: not that file -> the shipped one


def test_edited_config_path_that_does_not_exist_is_an_error_not_the_wheel_copy(tmp_path):
    missing = tmp_path / "configs" / "kaggle-t4.yaml"
    with pytest.raises(ConfigError, match="config file not found") as exc:
        load_train_config(missing)
    assert str(missing) in str(exc.value)


def test_every_loader_reads_shipped_names_and_sections(tmp_path):
    t4 = load_train_config("kaggle-t4")
    assert load_postprocess("kaggle-t4") == t4.postprocess
    assert load_config(InferenceConfig, "kaggle-t4", section="inference") == t4.inference
    bare = tmp_path / "pp.yaml"
    save_config(t4.postprocess, bare)
    assert load_config(PostprocessConfig, bare, section="postprocess") == t4.postprocess


def test_overrides_set_dotted_keys():
    cfg = load_train_config("smoke-cpu", {"train.epochs": 3, "optim.lr": 0.5, "validation.patch_size": [64, 64, 64]})
    assert (cfg.train.epochs, cfg.optim.lr, cfg.validation.patch_size) == (3, 0.5, [64, 64, 64])


# ---------------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("train: {epochs: 0}\n", "train.epochs: must be >= 1, got 0"),
        ("optim: {lr: -1}\n", "optim.lr: must be > 0"),
        ("validation: {overlap: 1.5}\n", "validation.overlap: must be in [0, 1)"),
        ("inference: {overlap: 1.0}\n", "inference.overlap: must be in [0, 1)"),
        ("train: {amp: fp8}\n", "train.amp: must be one of auto, off, fp16, bf16, got 'fp8'"),
        ("postprocess: {border: -1}\n", "postprocess.border must be >= 0"),
    ],
)
def test_one_file_prefix_and_one_key_prefix_per_message(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    assert str(exc.value) == f"{path}: {expected}" or str(exc.value).startswith(f"{path}: {expected}")
    section = expected.split(".")[0]
    assert f"{section}: {section}" not in str(exc.value)  # not "train: train.epochs: ..."


def test_tune_space_messages_have_one_prefix(tmp_path):
    bad = tmp_path / "space.yaml"
    bad.write_text("threshold: [1.5]\n")
    with pytest.raises(ConfigError) as exc:
        load_search_space(bad)
    assert str(exc.value) == f"{bad}: tune.threshold: values must be in [0, 1], got [1.5]"


def test_class_errors_without_a_key_path_keep_their_section_prefix():
    with pytest.raises(ConfigError, match=r"^postprocess\.hysteresis_low and postprocess\.hysteresis_high"):
        from_dict(PostprocessConfig, {"hysteresis_low": 0.2}, "postprocess")


# ---------------------------------------------------------------------------------- aliases


def test_old_fill_holes_key_is_read_as_fill_pinholes_with_a_warning(tmp_path, caplog):
    path = tmp_path / "pp.yaml"
    path.write_text("postprocess:\n  fill_holes: true\n  threshold: 0.4\n")
    with caplog.at_level(logging.WARNING, logger="kaggle_utils.config"):
        with pytest.warns(ConfigDeprecationWarning, match=r"postprocess\.fill_holes is deprecated: renamed "
                                                          r"postprocess\.fill_pinholes"):
            cfg = load_postprocess(path)
    assert cfg == PostprocessConfig(threshold=0.4, fill_pinholes=True)
    assert "fill_pinholes" in to_dict(cfg) and "fill_holes" not in to_dict(cfg)
    # in a whole training config and in a tune search space too
    with pytest.warns(ConfigDeprecationWarning):
        assert from_dict(TrainConfig, {"postprocess": {"fill_holes": True}}).postprocess.fill_pinholes is True
    with pytest.warns(ConfigDeprecationWarning, match=r"tune\.fill_holes"):
        assert load_search_space(data={"fill_holes": [True]}).fill_pinholes == [True]


def test_old_and_new_key_together_is_an_error():
    with pytest.raises(ConfigError, match=r"postprocess\.fill_holes: old name of postprocess\.fill_pinholes"):
        from_dict(PostprocessConfig, {"fill_holes": True, "fill_pinholes": False}, "postprocess")


def test_new_keys_load_without_any_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in shipped_configs():
            load_train_config(name)


# ---------------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("value", "mode", "deprecated"),
    [("auto", "auto", False), ("off", "off", False), (False, "off", False), (None, "off", False),
     ("fp16", "fp16", False), ("bf16", "bf16", False), ("none", "off", True), (True, "fp16", True)],
)
def test_one_amp_vocabulary_with_old_values_as_aliases(value, mode, deprecated):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert normalize_amp(value, "x.amp") == mode
    assert any(issubclass(w.category, ConfigDeprecationWarning) for w in seen) == deprecated
    assert mode in AMP_MODES


def test_train_and_inference_sections_share_the_vocabulary(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\ninference:\n  amp: bf16\n")  # YAML off is false
    cfg = load_train_config(path)
    assert (cfg.train.amp, cfg.inference.amp) == ("off", "bf16")
    path.write_text("train:\n  amp: none\ninference:\n  amp: true\n")  # the two old vocabularies
    with pytest.warns(ConfigDeprecationWarning) as rec:
        cfg = load_train_config(path)
    assert (cfg.train.amp, cfg.inference.amp) == ("off", "fp16")
    assert {"train.amp", "inference.amp"} <= {str(w.message).split(":")[0] for w in rec}
    for section in (LoopConfig, InferenceConfig):  # one vocabulary, documented in both dataclasses
        assert all(m in (section.__doc__ or "") for m in ("``off``", "``auto``", "``fp16``", "``bf16``"))
    # the canonical value round-trips through YAML (a string 'off', not false)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_train_config(tmp_path / "saved.yaml").train.amp == "off"


def test_amp_modes_to_autocast_dtype():
    assert resolve_amp_dtype("off", "cuda") is None
    assert resolve_amp_dtype("auto", "cpu") is None
    assert resolve_amp_dtype("fp16", "cuda") is torch.float16
    assert resolve_amp_dtype("fp16", "cpu") is torch.bfloat16
    assert resolve_amp_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match=r"^amp: must be one of auto, off, fp16, bf16"):
        resolve_amp_dtype("fp8", "cpu")


def test_canonical_dict_maps_a_stored_old_config_quietly():
    stored = {"train": {"amp": "none", "epochs": 3}, "postprocess": {"fill_holes": True}, "inference": {"amp": True}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = canonical_dict(TrainConfig, stored)
    assert out == {"train": {"amp": "off", "epochs": 3}, "postprocess": {"fill_pinholes": True},
                   "inference": {"amp": "fp16"}}
    assert canonical_dict(TrainConfig, {"train": {"epochs": "many"}}) == {"train": {"epochs": "many"}}


def test_search_space_field_names_follow_postprocess():
    from kaggle_utils.tune import BASIC_COORDINATES

    pp = {f.name for f in dataclasses.fields(PostprocessConfig)}
    space = {f.name for f in dataclasses.fields(SearchSpace)}
    assert "fill_pinholes" in pp & space and "fill_holes" not in pp | space
    assert set(BASIC_COORDINATES) <= pp & space


# ---------------------------------------------------------------------------------- CLI, folds


def test_time_limit_flag_has_one_spelling_and_the_old_one_still_parses(capsys):
    from kaggle_utils.cli import build_parser

    parser = build_parser()
    for cmd in (["train", "--config", "smoke-cpu", "--out", "run"], ["predict", "--checkpoint", "m.pt"]):
        assert parser.parse_args([*cmd, "--time-limit-s", "60"]).time_limit_s == 60.0
        assert parser.parse_args([*cmd, "--time-limit", "61"]).time_limit_s == 61.0  # hidden old spelling
    assert parser.parse_args(["train", "--config", "smoke-cpu", "--out", "run"]).time_limit_s is None
    assert parser.parse_args(["predict", "--checkpoint", "m.pt"]).time_limit_s == pytest.approx(29160.0)
    for command in ("train", "predict"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        shown = capsys.readouterr().out
        assert "--time-limit-s" in shown and "--time-limit " not in shown


def test_train_torchrun_command_uses_the_one_spelling():
    from kaggle_utils.train import torchrun_command

    cmd = torchrun_command(2, "kaggle-t4", "d", "o", 0, time_limit=100)
    assert cmd[cmd.index("--time-limit-s") + 1] == "100"


def test_assign_folds_accepts_one_fold(tmp_path):
    from kaggle_utils.data import DataError, load_index, make_folds
    from kaggle_utils.train import assign_folds

    (tmp_path / "train.csv").write_text("id,scroll_id\n" + "".join(f"{i},{s}\n" for i, s in
                                                                    [(1, "a"), (2, "a"), (3, "b"), (4, "c")]))
    index = load_index(tmp_path, "train", check_files=False)
    assert assign_folds(index, 1) == {"1": 0, "2": 0, "3": 0, "4": 0}  # n_folds 1: none held out
    assert assign_folds(index, 3) == make_folds(index, 3)
    with pytest.raises(DataError, match="train.n_folds"):
        assign_folds(index, 4)  # 3 scrolls
    with pytest.raises(ConfigError, match="train.n_folds"):
        assign_folds(index, 0)
