"""Tests for kaggle_utils.memory: reading the machine's memory, the budget and its overrides, the split of
the budget between the decoded-volume caches of all ranks and workers, the refusals, predict's plan,
and the shipped Kaggle configs on a T4x2 box (about 30 GB, 2 ranks) at the competition's geometry."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from kaggle_utils.config import ConfigError
from kaggle_utils.memory import (
    GiB,
    MachineMemory,
    MemoryBudgetError,
    PredictMemoryInputs,
    TrainMemoryInputs,
    budget_bytes,
    parse_meminfo,
    plan_predict_memory,
    plan_train_memory,
    read_machine_memory,
    train_memory_inputs,
)

MiB = 1024**2
V320 = 2 * 320**3  # decoded image + label of one 320^3 volume

MEMINFO = "MemTotal:       31457280 kB\nMemFree:         1000000 kB\nMemAvailable:   25165824 kB\nHugePages_Total:       0\n"


def _inputs(**kw) -> TrainMemoryInputs:
    base = dict(ranks=2, workers=2, volume_bytes=V320, dataset_bytes=600 * V320, batch_bytes=10 * MiB,
                prefetch_factor=2, pin_memory=False, val_voxels=0, model_bytes=0, on_gpu=True,
                worker_bytes=512 * MiB, val_bytes_per_voxel=40)
    base.update(kw)
    return TrainMemoryInputs(**base)


def test_parse_meminfo_in_bytes():
    info = parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 30 * GiB
    assert info["MemAvailable"] == 24 * GiB
    assert info["HugePages_Total"] == 0


def test_read_machine_memory_without_and_with_a_cgroup_limit(tmp_path):
    proc = tmp_path / "meminfo"
    proc.write_text(MEMINFO)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("max\n")
    assert read_machine_memory(proc, v2) == MachineMemory(30 * GiB, 24 * GiB, None, None)
    (v2 / "memory.max").write_text(str(16 * GiB))
    (v2 / "memory.current").write_text(str(6 * GiB))
    (v2 / "memory.stat").write_text(f"anon 123\ninactive_file {2 * GiB}\nactive_file 5\n")
    m = read_machine_memory(proc, v2)
    assert (m.cgroup_limit, m.cgroup_used) == (16 * GiB, 4 * GiB)  # page cache that can be dropped is not used
    assert m.free == 12 * GiB  # the cgroup's room, below MemAvailable
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(10 * GiB))
    (v1 / "memory.usage_in_bytes").write_text(str(3 * GiB))
    (v1 / "memory.stat").write_text(f"total_inactive_file {1 * GiB}\n")
    assert read_machine_memory(proc, tmp_path / "v1").free == 8 * GiB
    (v1 / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert read_machine_memory(proc, tmp_path / "v1").cgroup_limit is None


def test_budget_is_a_share_of_the_free_memory_unless_overridden():
    m = MachineMemory(30 * GiB, 25 * GiB)
    assert budget_bytes(m)[0] == int(0.8 * 25 * GiB)
    assert budget_bytes(m, fraction=0.5)[0] == int(12.5 * GiB)
    budget, how = budget_bytes(m, override_gb=7.5)
    assert budget == int(7.5 * GiB) and "7.5 GiB" in how


def test_auto_split_shares_what_the_fixed_costs_leave_between_every_worker_of_every_rank():
    x = _inputs(val_voxels=320**3)
    plan = plan_train_memory(x, 20 * GiB, "test")
    fixed = {"workers": 4 * 512 * MiB, "batches": 2 * (2 * 2 + 1) * 10 * MiB, "validation": 40 * 320**3,
             "model": 0}
    assert {k: plan.costs[k] for k in fixed} == fixed
    assert plan.n_caches == 4
    assert plan.cache_per_worker == (20 * GiB - sum(fixed.values())) // 4
    assert plan.fits and plan.total <= 20 * GiB
    line = plan.line()
    assert line.startswith("decoded-volume cache: ") and "across 2 rank(s) x 2 worker(s)" in line
    assert "20.0 GiB budget (test)" in line


def test_auto_split_caps_each_cache_at_the_training_set_and_counts_the_rank_without_workers():
    plan = plan_train_memory(_inputs(dataset_bytes=3 * V320, workers=0, ranks=1), 20 * GiB)
    assert plan.cache_per_worker == 3 * V320 and plan.n_caches == 1
    assert "every training volume fits" in plan.line()


def test_pinned_memory_doubles_the_batches_in_flight():
    assert plan_train_memory(_inputs(pin_memory=True), 20 * GiB).costs["batches"] == 2 * 5 * 2 * 10 * MiB


def test_refusal_when_not_one_volume_per_worker_fits_names_num_workers_and_prepare():
    x = _inputs(ranks=2, workers=4)
    budget = 8 * 512 * MiB + 2 * 9 * 10 * MiB + 4 * V320  # fixed + room for 4 volumes, 8 caches
    plan = plan_train_memory(x, budget)
    assert not plan.fits
    assert "train.num_workers to 3" in plan.problem and "prepare" in plan.problem  # one worker less frees 1 GiB
    assert "\n" not in plan.problem
    assert plan_train_memory(dataclasses.replace(x, workers=3), budget).fits


def test_refusal_when_the_fixed_costs_alone_exceed_the_budget_names_the_largest():
    plan = plan_train_memory(_inputs(val_voxels=384**3), 2 * GiB)
    assert not plan.fits and plan.problem.startswith("memory: the run needs")
    assert "validation.n_volumes" in plan.problem and "--memory-gb" in plan.problem


def test_explicit_cache_bytes_is_checked_against_the_budget():
    x = _inputs(cache_bytes=8 * GiB)  # the old shipped value: 8 GiB per worker, 4 workers
    plan = plan_train_memory(x, 24 * GiB)
    assert not plan.fits
    fit = (24 * GiB - plan.costs["workers"] - plan.costs["batches"]) // 4
    assert f"lower sampler.cache_bytes to {fit} " in plan.problem and "null" in plan.problem
    ok = plan_train_memory(dataclasses.replace(x, cache_bytes=fit), 24 * GiB)
    assert ok.fits and ok.cache_per_worker == fit
    small_data = plan_train_memory(dataclasses.replace(x, dataset_bytes=3 * V320), 24 * GiB)  # the demo's data
    assert small_data.fits and small_data.cache_per_worker == 3 * V320


def test_a_prepared_cache_holds_no_decoded_volumes():
    plan = plan_train_memory(_inputs(prepared=True), 4 * GiB)
    assert plan.fits and plan.costs["caches"] == 0 and plan.cache_per_worker == 0
    assert "prepared cache" in plan.line()
    assert not plan_train_memory(_inputs(prepared=True, val_voxels=384**3), 2 * GiB).fits


def test_memory_budget_error_is_a_config_error():
    assert issubclass(MemoryBudgetError, ConfigError)


def test_predict_plan_keeps_the_read_ahead_drops_it_or_refuses():
    x = PredictMemoryInputs(n_models=3, model_bytes=3 * 200 * MiB, voxels=320**3, prefetch=1, on_gpu=True,
                            bytes_per_voxel=24)
    depth, costs, problem = plan_predict_memory(x, 8 * GiB)
    assert (depth, problem) == (1, None)
    assert costs == {"models": 200 * MiB, "volume": 24 * 320**3, "prefetch": 2 * 5 * 320**3}
    tight = costs["models"] + costs["volume"] + 1
    assert plan_predict_memory(x, tight)[:1] == (0,) and plan_predict_memory(x, tight)[2] is None
    depth, _, problem = plan_predict_memory(dataclasses.replace(x, on_gpu=False, model_bytes=3 * 4 * GiB), 8 * GiB)
    assert problem is not None and "fewer --checkpoint" in problem


# ----------------------------------------------------------------------------------------------
# The shipped Kaggle configs on a T4x2 box at the competition's geometry
# ----------------------------------------------------------------------------------------------

# 786 training volumes: 738 of 320^3, 47 of 256^3, one of 384^3 (COMPETITION.md); fold 0 holds out the largest
# scroll (382 volumes), so the other folds train on more: take every volume as training data.
SHAPES = {f"v{i}": (320, 320, 320) for i in range(738)}
SHAPES.update({f"s{i}": (256, 256, 256) for i in range(47)})
SHAPES["big"] = (384, 384, 384)
# A Kaggle T4x2 box: about 30 GB of RAM. Free when the run starts: 30 GB minus the notebook kernel and the two
# ranks' interpreters with CUDA (assumed 2.5 GiB each, and 1 GiB for the notebook): about 22 GiB.
KAGGLE_FREE = 30 * 10**9 - 6 * GiB


@functools.cache
def _model_bytes(name: str) -> int:
    from kaggle_utils.models import build_model
    from kaggle_utils.train import load_train_config

    return sum(p.numel() * 4 for p in build_model(load_train_config(name).model).parameters())


@pytest.mark.parametrize("name", ["kaggle-t4", "kaggle-t4-resenc-m", "kaggle-t4-resenc-m-ft192"])
@pytest.mark.parametrize("prepared", [None, "packed"])
def test_shipped_kaggle_configs_fit_a_t4x2_box(name, prepared):
    from kaggle_utils.train import load_train_config

    cfg = load_train_config(name)
    model_bytes = _model_bytes(name)
    val = ["big"] + [f"v{i}" for i in range(cfg.validation.n_volumes - 1)]
    x = train_memory_inputs(cfg, list(SHAPES), val, SHAPES, model_bytes, ranks=2, on_gpu=True,
                            prepared_labels=prepared)
    budget, _ = budget_bytes(MachineMemory(30 * 10**9, KAGGLE_FREE), cfg.train.memory_fraction, cfg.train.memory_gb)
    plan = plan_train_memory(x, budget)
    assert plan.fits, plan.problem
    assert plan.total <= budget
    if prepared is None:
        assert cfg.sampler.cache_bytes is None  # a share of the budget, never a fixed amount per worker
        assert plan.cache_per_worker >= 10 * V320  # each worker keeps at least 10 volumes decoded


def test_memory_config_keys_are_checked():
    from kaggle_utils.train import load_train_config

    assert load_train_config("kaggle-t4", {"train.memory_gb": 12}).train.memory_gb == 12.0
    with pytest.raises(ConfigError, match="train.memory_gb"):
        load_train_config("kaggle-t4", {"train.memory_gb": 0})
    with pytest.raises(ConfigError, match="train.memory_fraction"):
        load_train_config("kaggle-t4", {"train.memory_fraction": 1.5})
    cfg = load_train_config("kaggle-t4", {"sampler.prepared": "/some/cache"})
    assert cfg.sampler.prepared == ["/some/cache"]  # one folder or a list


def test_predict_refuses_a_budget_too_small_before_any_volume(tiny_train_data, tmp_path):
    import torch

    from kaggle_utils.predict import PredictError, predict_dataset

    model = torch.nn.Conv3d(1, 1, 3, padding=1)
    with pytest.raises(PredictError, match=r"^memory: predict needs .* but the budget is"):
        predict_dataset(models=[model], data_dir=tiny_train_data, out_zip=tmp_path / "sub.zip", device="cpu",
                        progress=False, memory_gb=1e-4)
    assert not (tmp_path / "sub.zip").exists() and not (tmp_path / "sub.zip.parts").exists()
