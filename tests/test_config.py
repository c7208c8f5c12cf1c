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
from kaggle_utils.device import AMP_MODES, normalize_amp, resolve_amp_dtype
from kaggle_utils.inference import InferenceConfig
from kaggle_utils.postprocess import PostprocessConfig, load_postprocess
from kaggle_utils.train import LoopConfig, TrainConfig, load_train_config
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
    assert (cfg.train.epochs, cfg.optim.lr, cfg.validation.patch_size) == (3, 0.5, (64, 64, 64))


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


# ---------------------------------------------------------------------------------- issue 25: values


@pytest.mark.parametrize("text", ["2e-3", "1E-4", "+5e2", ".5e1", "3"])
def test_float_fields_accept_numbers_that_yaml_1_1_reads_as_strings(tmp_path, text):
    """``lr: 2e-3`` is a string to PyYAML (YAML 1.1 needs a dot); every float field takes it."""
    path = tmp_path / "cfg.yaml"
    path.write_text(f"optim: {{lr: {text}, min_lr_ratio: 1e-2}}\npostprocess: {{threshold: 5e-1}}\n"
                    f"train: {{time_budget_s: 3e2}}\n")
    cfg = load_train_config(path)
    assert cfg.optim.lr == float(text) and isinstance(cfg.optim.lr, float)
    assert (cfg.optim.min_lr_ratio, cfg.postprocess.threshold, cfg.train.time_budget_s) == (0.01, 0.5, 300.0)
    # a float inside a list or a mapping too (search space values, loss weights)
    assert load_search_space(data={"threshold": ["4e-1", 0.5]}).threshold == [0.4, 0.5]
    assert from_dict(TrainConfig, {"loss": {"weights": {"dice": "1e0"}}}).loss.weights == {"dice": 1.0}


def test_text_that_is_not_a_number_still_names_the_key(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim: {lr: 2e-3x}\n")
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    assert str(exc.value) == f"{path}: optim.lr: expected a number, got '2e-3x'"
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected an integer, got '3'"):
        from_dict(TrainConfig, {"train": {"epochs": "3"}})  # int fields stay strict


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("threshold: 1.5\n", "postprocess.threshold must be a probability in [0, 1], got 1.5"),
        ("threshold: -0.2\n", "postprocess.threshold must be a probability in [0, 1], got -0.2"),
        ("postprocess: {hysteresis_low: -0.1, hysteresis_high: 0.5}\n",
         "postprocess.hysteresis_low must be a probability in [0, 1], got -0.1"),
        ("postprocess: {hysteresis_low: 0.3, hysteresis_high: 1.2}\n",
         "postprocess.hysteresis_high must be a probability in [0, 1], got 1.2"),
    ],
)
def test_probability_settings_are_range_checked_in_one_line(tmp_path, yaml_text, expected):
    path = tmp_path / "pp.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_postprocess(path)
    assert str(exc.value) == f"{path}: {expected}"


@pytest.mark.parametrize(
    ("section", "text", "key"),
    [
        ("postprocess", "{threshold: 1.5}", "postprocess.threshold"),
        ("loss", "{focal_alpha: 1.5}", "loss.focal_alpha"),
        ("optim", "{min_lr_ratio: 2}", "optim.min_lr_ratio"),
        ("optim", "{name: SGD, momentum: 1.5}", "optim.momentum"),
        ("validation", "{collapse_max_fg: 1.5}", "validation.collapse_max_fg"),
        ("sampler", "{surface_share: 1.5}", "sampler.surface_share"),
        ("augment", "{p_flip: -0.2}", "augment.p_flip"),
    ],
)
def test_probability_like_training_settings_name_file_and_key(tmp_path, section, text, key):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"{section}: {text}\n")
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    assert str(exc.value).startswith(f"{path}: {key}") and "\n" not in str(exc.value)


def test_search_space_base_threshold_is_range_checked(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("base: {threshold: 1.5}\n")
    with pytest.raises(ConfigError, match=r"postprocess\.threshold must be a probability in \[0, 1\], got 1.5"):
        load_search_space(path)


def test_predict_refuses_an_out_of_range_threshold_before_predicting(tmp_path, capsys):
    from kaggle_utils.cli import main

    path = tmp_path / "pp.yaml"
    path.write_text("threshold: 1.5\n")
    rc = main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--postprocess", str(path),
               "--data-dir", str(tmp_path), "--out", str(tmp_path / "submission.zip")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"error: {path}: postprocess.threshold must be a probability in [0, 1], got 1.5"
    assert not (tmp_path / "submission.zip").exists()


# ---------------------------------------------------------------------------------- issue 25: base and --set

BEFORE_BASE = Path(__file__).parent / "data" / "configs_before_base"


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads_to_the_same_values_as_before_base(name):
    """Shipped configs rewritten with ``base:`` load to exactly what their full copies (kept under
    tests/data/configs_before_base) loaded to; the others hold no ``base:`` to resolve."""
    from kaggle_utils.config import load_yaml, load_yaml_tree

    cfg = to_dict(load_train_config(name))
    before = BEFORE_BASE / f"{name}.yaml"
    if before.is_file():
        assert "base" in load_yaml(SHIPPED_CONFIG_DIR / f"{name}.yaml")
        assert cfg == to_dict(load_train_config(before))
    else:
        assert load_yaml_tree(SHIPPED_CONFIG_DIR / f"{name}.yaml") == load_yaml(SHIPPED_CONFIG_DIR / f"{name}.yaml")


def test_at_least_two_shipped_configs_inherit():
    assert sorted(p.stem for p in BEFORE_BASE.glob("*.yaml")) == ["kaggle-t4-resenc-m-ft192", "seed-v2"]


def test_base_is_deep_merged_relative_to_the_file_or_a_shipped_name(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "parent.yaml").write_text("base: smoke-cpu\noptim: {lr: 0.5}\ntrain: {epochs: 4}\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: parent\ntrain: {epochs: 7}\n")  # relative to child's folder, .yaml optional
    cfg = load_train_config(child)
    smoke = load_train_config("smoke-cpu")
    assert (cfg.train.epochs, cfg.optim.lr) == (7, 0.5)
    assert cfg.train.batch_size == smoke.train.batch_size and cfg.model == smoke.model  # the grandparent's
    assert cfg.optim.name == smoke.optim.name  # merged, not replaced: optim keys the parent did not set
    # a postprocess section inherited the same way, for predict --postprocess
    assert load_postprocess(child) == smoke.postprocess


def test_base_errors_name_the_file_and_cycles(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a\n")
    with pytest.raises(ConfigError, match=r"inheritance cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml") as exc:
        load_train_config(a)
    assert str(exc.value).startswith(str(a)) and "\n" not in str(exc.value)
    a.write_text("base: missing-name\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base: missing-name: no such file next to it .*kaggle-t4"):
        load_train_config(a)
    a.write_text("base: [x, y]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base: expected a config file or shipped config name"):
        load_train_config(a)


def test_search_space_base_mapping_is_a_setting_not_inheritance(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("threshold: [0.4]\nbase: {border: 2}\n")
    assert load_search_space(path).base.border == 2


def test_set_overrides_parse_yaml_values_and_check_keys():
    from kaggle_utils.config import parse_overrides

    got = parse_overrides(["optim.lr=1e-3", "sampler.patch_size=[64,64,64]", "validation.ids=null",
                           "postprocess.threshold=0.4"])
    assert got == {"optim.lr": "1e-3", "sampler.patch_size": [64, 64, 64], "validation.ids": None,
                   "postprocess.threshold": 0.4}
    cfg = load_train_config("smoke-cpu", got)
    assert (cfg.optim.lr, cfg.sampler.patch_size, cfg.postprocess.threshold) == (1e-3, (64, 64, 64), 0.4)
    for bad in ("optim.lr", "=3", "optim..lr=1", "a b=1"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match=r"^--set optim\.lr: invalid YAML value"):
        parse_overrides(["optim.lr=[1,"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) optim\.lrr; allowed under optim"):
        load_train_config("smoke-cpu", parse_overrides(["optim.lrr=1"]))


def _parse_only(monkeypatch, target: str):
    """Replace ``target`` (a library call of a CLI command) with one that records its arguments and stops."""
    import importlib

    seen = {}

    class Stop(Exception):
        pass

    def fake(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise Stop

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, fake)
    return seen, Stop


def test_train_cli_set_reaches_the_config(tmp_path, monkeypatch, capsys):
    from kaggle_utils.cli import main

    seen, Stop = _parse_only(monkeypatch, "kaggle_utils.train.train")
    with pytest.raises(Stop):
        main(["train", "--config", "smoke-cpu", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
              "--set", "optim.lr=2e-3", "--set", "sampler.patch_size=[32,32,64]", "--epochs", "2"])
    cfg = seen["args"][0]
    assert (cfg.optim.lr, cfg.sampler.patch_size, cfg.train.epochs) == (2e-3, (32, 32, 64), 2)
    assert main(["train", "--config", "smoke-cpu", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown config key(s) optim.lrr" in err and err.count("\n") == 1


def test_predict_and_tune_cli_set(tmp_path, monkeypatch, capsys):
    from kaggle_utils.cli import main

    seen, Stop = _parse_only(monkeypatch, "kaggle_utils.predict.predict_dataset")
    with pytest.raises(Stop):
        main(["predict", "--checkpoint", "m.pt", "--data-dir", str(tmp_path), "--config", "kaggle-t4",
              "--postprocess", "kaggle-t4", "--set", "inference.batch_size=4", "--set", "postprocess.threshold=0.35"])
    assert seen["kwargs"]["inference_cfg"].batch_size == 4
    assert seen["kwargs"]["postprocess_cfg"].threshold == 0.35
    assert main(["predict", "--checkpoint", "m.pt", "--set", "postprocess.threshold=0.3"]) == 2
    assert "needs --postprocess FILE" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", "m.pt", "--config", "kaggle-t4", "--set", "optim.lr=1"]) == 2
    assert "key must start with one of inference., postprocess." in capsys.readouterr().err

    seen, Stop = _parse_only(monkeypatch, "kaggle_utils.tune.load_probs")
    import kaggle_utils.tune as tune_mod

    spaces = []
    real = tune_mod.load_search_space
    monkeypatch.setattr(tune_mod, "load_search_space", lambda *a, **k: spaces.append(real(*a, **k)) or spaces[-1])
    with pytest.raises(Stop):
        main(["tune", "--probs", str(tmp_path), "--set", "threshold=[0.3,0.4]", "--set", "base.border=3"])
    assert spaces[-1].threshold == [0.3, 0.4] and spaces[-1].base.border == 3
    assert main(["tune", "--probs", str(tmp_path), "--set", "thresholds=[0.3]"]) == 2
    assert "unknown config key(s) tune.thresholds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- patch shape


@pytest.mark.parametrize("value", [128, 128.0, (128, 128, 128), [128, 128, 128], (128,)])
def test_one_patch_shape_reading_everywhere(value):
    """sampler, inference, the window planner and the model check read one int as a cube, the same way."""
    from kaggle_utils.config import as_patch_shape
    from kaggle_utils.inference import InferenceConfig
    from kaggle_utils.models import validate_patch_size
    from kaggle_utils.plan import window_count
    from kaggle_utils.sampling import SamplerConfig

    assert as_patch_shape(value) == (128, 128, 128)
    assert InferenceConfig(patch_size=value).patch_size == (128, 128, 128)
    assert SamplerConfig(patch_size=value).patch_size == (128, 128, 128)
    assert validate_patch_size(value) == (128, 128, 128)
    assert window_count((128, 128, 128), value, 0.5) == 1


@pytest.mark.parametrize(("value", "message"), [
    ((64, 64), r"inference.patch_size: expected one edge \(a cube\) or three edges"),
    ("128", "expected one edge"),
    ((64, 0, 64), "inference.patch_size: every edge must be positive"),
    (-32, "every edge must be positive"),
    ((64.5, 64, 64), "whole numbers"),
    (True, "whole numbers"),
    ((None, 64, 64), "whole numbers"),
])
def test_a_bad_patch_shape_is_one_line_naming_its_key(value, message):
    from kaggle_utils.inference import InferenceConfig

    with pytest.raises(ValueError, match=message):
        InferenceConfig(patch_size=value)
    with pytest.raises(ConfigError, match=message):
        from_dict(InferenceConfig, {"patch_size": value}, "inference")


def test_yaml_patch_size_may_be_one_int_for_a_cube(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: demo-cpu\nsampler:\n  patch_size: 64\nvalidation:\n  patch_size: 64\n"
                    "inference:\n  patch_size: 64\n")
    cfg = load_train_config(path)
    assert cfg.sampler.patch_size == cfg.validation.patch_size == cfg.inference.patch_size == (64, 64, 64)
