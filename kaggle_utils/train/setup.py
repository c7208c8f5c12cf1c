"""Setting a fold's run up: folds, data, the prepared cache, the memory plan, the model and its
optimizer (:func:`_set_up`); the run folder check (:func:`check_run_dir`); weights of another run
(``train.init_from``); and a resume from ``last.pt`` (:func:`_resume`, refused for a config that changes
training unless allowed)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..collapse import CollapseGuard
from ..config import ConfigError, canonical_dict, to_dict
from ..data import DataError, atomic_path, load_index, make_folds, split_fold
from ..device import check_gpu_supported, resolve_amp_dtype, warn_slow_conv3d_amp
from ..losses import build_loss
from ..models import build_model, set_deep_supervision
from ..sampling import PatchDataset, check_labels, default_cache, make_loader
from .config import TrainConfig
from .dist import _Dist
from .record import _first_line, logger
from .schedule import LRSchedule, build_optimizer
from .state import RunState, _seed_everything, _set_rng_state

__all__ = ["RESUME_SAFE_KEYS", "check_fold", "split_train_val", "assign_folds", "config_differences",
           "checkpoint_bytes", "check_run_dir"]


# keys a resumed run may change without allow_config_change: they do not alter the trajectory
# (the collapse limits only judge validations: a run of an older version, saved with the old 3.0x limit,
# resumes under the current rule)
RESUME_SAFE_KEYS = frozenset({"train.time_limit_s", "train.num_workers", "train.check_labels", "train.init_from",
                              "sampler.cache_bytes", "sampler.cache_dir", "validation.write_oof",
                              "validation.oof_format",
                              "sampler.prepared", "train.memory_gb", "train.memory_fraction",
                              "validation.collapse_max_ratio", "validation.collapse_max_fg",
                              "validation.collapse_recover_ratio", "validation.collapse_stop_after",
                              "validation.collapse_min_ratio"})


def check_fold(fold: int | str, n_folds: int) -> None:
    """Raise :class:`ConfigError` (one line naming ``train.n_folds``) unless ``0 <= fold < n_folds``
    or ``fold`` is ``"all"`` (every volume trained on, none held out)."""
    if fold == "all":
        return
    if not isinstance(fold, int) or not 0 <= fold < n_folds:
        folds = "fold 0 only (train.n_folds 1 holds no fold out)" if n_folds == 1 else f"0..{n_folds - 1}"
        raise ConfigError(f"fold {fold}: not a fold of train.n_folds {n_folds}; use {folds} "
                          f"(on the CLI, --fold -1 trains every fold)")


def split_train_val(index: Any, fold: int | str, n_folds: int) -> tuple[Any, Any]:
    """``(train_index, val_index)`` of ``fold``: scroll-grouped folds (``data.split_fold``), or with
    ``fold`` ``"all"`` or ``n_folds`` 1 every volume for training and none held out.

    Raises:
        ConfigError: ``fold`` is not one of the folds.
        DataError: fewer scrolls than folds (the message says which ``train.n_folds`` works).
    """
    check_fold(fold, n_folds)
    if fold == "all" or n_folds == 1:
        return index, index.subset([])
    try:
        return split_fold(index, fold, n_folds)
    except DataError as exc:
        raise DataError(f"{exc} (train.n_folds in the config; 1 trains on every volume without a held-out fold)"
                        ) from None


def assign_folds(index: Any, n_folds: int) -> dict[str, int]:
    """``{volume_id: fold}`` for ``train.n_folds``: the scroll-grouped folds of ``data.make_folds``,
    or with ``n_folds`` 1 every volume in fold 0 (trained on; none held out, see :func:`split_train_val`).

    Raises:
        ConfigError: ``n_folds`` below 1.
        DataError: fewer scrolls than folds (the message says which ``train.n_folds`` works).
    """
    check_fold(0, n_folds)
    if n_folds == 1:
        return {r.id: 0 for r in index}
    try:
        return make_folds(index, n_folds)
    except DataError as exc:
        raise DataError(f"{exc} (train.n_folds in the config; 1 trains on every volume without a held-out fold)"
                        ) from None


def config_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, old value, new value)]`` of the keys both configs hold with different values
    (keys only one of them holds, e.g. added by a newer version of the package, are left out)."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


# ----------------------------------------------------------------------------------------------
# A fresh run: data, memory, model, optimizer
# ----------------------------------------------------------------------------------------------


def _open_prepared(cfg: TrainConfig, train_idx: Any, val_idx: Any, dist: _Dist) -> Any:
    """The prepared cache of ``sampler.prepared`` checked against the data folder (every training volume
    prepared, from the same TIFFs; held-out volumes it lacks are read from the TIFFs), or ``None``."""
    if not cfg.sampler.prepared:
        return None
    from ..prepare import open_prepared

    prepared = open_prepared(cfg.sampler.prepared, train_idx, cfg.sampler.surface_points)
    held = list({r.id: r for r in val_idx if r.id in prepared}.values())
    val_idx = {r.id for r in val_idx}
    prepared.check(held)
    if dist.main:
        kinds = sorted({prepared.entries[r.id]["labels"] for r in train_idx})
        logger.info(f"prepared cache {', '.join(map(str, prepared.folders))}: {len(train_idx)} training and "
                    f"{len(held)} of {len(val_idx)} held-out volume(s) memory-mapped (labels {'/'.join(kinds)}, "
                    f"checked by prepare)")
    return prepared


def _load_data(cfg: TrainConfig, data_dir: str | os.PathLike, fold: int, dist: _Dist,
               progress: bool) -> tuple[Any, Any, list, Any]:
    """Split the data, open the prepared cache (``sampler.prepared``) and (``train.check_labels``) check
    every id of the run it does not hold once, on rank 0: image headers, labels, shapes
    (``sampling.check_labels``), including held-out volumes beyond ``validation.n_volumes`` (their
    out-of-fold probabilities are written at the end); ``(train, held out, validated, prepared)``."""
    index = load_index(data_dir, "train")
    train_idx, val_idx = split_train_val(index, fold, cfg.train.n_folds)
    vc = cfg.validation
    candidates = list(val_idx)
    if not val_idx.records and vc.ids:  # no held-out fold: validate (in-sample) on the listed ids
        missing = sorted(set(vc.ids) - {r.id for r in index})
        if missing:
            raise ConfigError(f"validation.ids: {missing[:5]} not in {data_dir}/train.csv")
        candidates = list(index.subset(vc.ids))
    val_records = candidates[: vc.n_volumes] if vc.n_volumes is not None else candidates
    prepared = _open_prepared(cfg, train_idx, list(val_idx) + val_records, dist)
    every = {r.id: r for r in [*train_idx, *val_idx, *val_records]}  # every id the run reads
    to_check = [r for r in every.values() if prepared is None or r.id not in prepared]
    if cfg.train.check_labels and to_check:
        error: DataError | None = None
        if dist.main:
            t0 = time.monotonic()
            try:
                n = check_labels(to_check, workers=max(1, cfg.train.num_workers), progress=progress)
                logger.info(f"checked {n} label(s) in {time.monotonic() - t0:.1f}s (train.check_labels)")
            except DataError as exc:
                error = exc
        if dist.broadcast_flag(int(error is not None)):
            raise error if error is not None else DataError("rank 0 found a bad label (its message is above)")
    return train_idx, val_idx, val_records, prepared


def _plan_memory(cfg: TrainConfig, train_idx: Any, val_records: list, prepared: Any, model: nn.Module,
                 dist: _Dist) -> Any:
    """The run's :class:`~kaggle_utils.memory.MemoryPlan` (rank 0 reads the machine's memory; every rank
    plans with its budget), logged in one line; :class:`~kaggle_utils.memory.MemoryBudgetError` when
    the configuration cannot fit."""
    from ..memory import (MemoryBudgetError, budget_bytes, plan_train_memory, read_machine_memory,
                         train_memory_inputs, volume_shapes)

    tc = cfg.train
    records = list(train_idx) + list(val_records)
    shapes = volume_shapes(records, prepared)
    labels = None
    if prepared is not None:
        labels = "none" if any(prepared.entries[r.id]["labels"] == "none" for r in train_idx) else "npy"
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    x = train_memory_inputs(cfg, [r.id for r in train_idx], [r.id for r in val_records], shapes, model_bytes,
                            dist.world, dist.device.type == "cuda", labels)
    budget, source = 0, ""
    if dist.main:
        budget, source = budget_bytes(read_machine_memory(), tc.memory_fraction, tc.memory_gb)
    budget = int(dist.broadcast(float(budget)))
    plan = plan_train_memory(x, budget, source)
    if dist.main:
        logger.info(plan.line())
    if not plan.fits:
        raise MemoryBudgetError(plan.problem)
    return plan


def _set_up(cfg: TrainConfig, data_dir: str | os.PathLike, run_dir: Path, fold: int | str, dist: _Dist,
            limit: float | None, t_start: float, progress: bool) -> RunState:
    """Data, loader, model, loss, optimizer, schedule, scaler and EMA of a fresh run (seeded by ``train.seed``)."""
    tc, dev = cfg.train, dist.device
    check_gpu_supported(dev)  # a P100 with a cu128 torch: one line now, not a CUDA error at the first op
    if dev.type == "cuda":
        torch.backends.cudnn.deterministic = tc.deterministic
        torch.backends.cudnn.benchmark = not tc.deterministic
    train_idx, val_idx, val_records, prepared = _load_data(cfg, data_dir, fold, dist, progress)
    _seed_everything(tc.seed)
    model = build_model(cfg.model)
    memory = _plan_memory(cfg, train_idx, val_records, prepared, model, dist)
    if prepared is not None:
        prepared.label_cache_bytes = memory.cache_per_worker
    dataset = PatchDataset(train_idx, cfg.sampler, seed=tc.seed * 1000 + dist.rank,
                           cache=prepared if prepared is not None else default_cache(cfg.sampler, memory.cache_per_worker))
    loader = make_loader(dataset, batch_size=tc.batch_size, num_workers=tc.num_workers, pin_memory=dev.type == "cuda")
    steps_per_epoch = math.ceil(len(loader) / cfg.optim.accumulate)
    if tc.init_from:
        _init_from(model, cfg, tc.init_from)
    set_deep_supervision(model, cfg.loss.deep_supervision)
    model = model.to(dev, memory_format=torch.channels_last_3d) if tc.channels_last else model.to(dev)
    if dist.main:
        warn_slow_conv3d_amp(dev, resolve_amp_dtype(tc.amp, dev) is not None)
    loss_fn = build_loss(cfg.loss).to(dev)
    optimizer = build_optimizer(model, cfg.optim)
    budget = tc.time_budget_s
    schedule = LRSchedule(optimizer, cfg.optim, steps_per_epoch, tc.epochs,
                          budget_s=None if budget is None else budget * (1 - tc.budget_reserve))
    schedule.t0 = t_start  # the budget counts from the call's start (data loading included)
    scaler = torch.amp.GradScaler(dev.type, enabled=resolve_amp_dtype(tc.amp, dev) == torch.float16)
    ema = None
    if tc.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    return RunState(cfg=cfg, fold=fold, run_dir=run_dir, dist=dist, train_idx=train_idx, val_idx=val_idx,
                    val_records=val_records, dataset=dataset, loader=loader, model=model, train_model=model,
                    loss_fn=loss_fn, optimizer=optimizer, schedule=schedule, scaler=scaler, ema=ema,
                    t_start=t_start, limit=limit, progress=progress, budget=budget, prepared=prepared, memory=memory)


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """About how many bytes one ``last.pt``/``best.pt`` of this config takes, without building real weights.

    The network is built on torch's ``meta`` device (shapes only); a checkpoint holds its float32 weights,
    the EMA copy (``train.ema``) and the optimizer's state: two moments for AdamW, one momentum buffer for
    SGD (README: demo-cpu, 34.1 M parameters with EMA and AdamW -> 520.8 MiB = 4 x 4 bytes x 34.1 M).
    """
    import dataclasses

    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, weights_path=None, encoder_weights=None))
    n = sum(t.numel() for t in model.state_dict().values())
    states = 2 if cfg.optim.name == "AdamW" else int(cfg.optim.momentum > 0)
    return 4 * n * (1 + int(cfg.train.ema) + states)


def check_run_dir(cfg: TrainConfig, run_dir: str | os.PathLike) -> Path:
    """Before any work: the run folder can be created and written, with room for ``last.pt``, ``best.pt`` and
    the temporary copy of an atomic write (3 checkpoints, :func:`checkpoint_bytes`).

    Raises:
        OutputError: read-only, a file in the way; DiskFullError: less free space than that.
    """
    from ..outputs import check_output

    run_dir = Path(run_dir)
    reused = sum(p.stat().st_size for p in (run_dir / "last.pt", run_dir / "best.pt") if p.is_file())  # replaced
    return check_output(run_dir, "dir", need_bytes=max(0, 3 * checkpoint_bytes(cfg) - reused), what="--out")


def _init_from(model: nn.Module, cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Load another run's weights (its EMA weights when it kept them) into ``model`` (``train.init_from``).

    Any checkpoint of :func:`~kaggle_utils.models.save_checkpoint` or ``export`` of the same network
    works; the patch size may differ (the networks are fully convolutional).

    Raises:
        CheckpointError: the file is missing or not a kaggle_utils checkpoint.
        ConfigError: its weights belong to another network (both are named).
    """
    from ..config import from_dict
    from ..models import ModelConfig, _torch_load, describe_model

    path = Path(path)
    ckpt = _torch_load(path)
    state = ckpt["ema"] if isinstance(ckpt.get("ema"), dict) else ckpt["model"]
    state = {k.removeprefix("module."): v.float() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in state.items()}
    theirs = ckpt.get("model_config") or (ckpt.get("config") or {}).get("model")
    try:
        other = describe_model(from_dict(ModelConfig, dict(theirs), "model")) if theirs else "an unknown network"
    except (ConfigError, ValueError, TypeError):
        other = "an unreadable model config"
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"train.init_from: {path} holds {other}, which does not fit model "
                          f"{describe_model(cfg.model)} ({_first_line(exc)[:160]})") from None
    logger.info(f"initialized the weights from {path} ({other})")


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------


def _read_last(state: RunState, allow_config_change: bool) -> dict:
    """``last.pt`` of the run, after checking it was trained with this config (see :func:`_resume`)."""
    path = state.last_path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise DataError(f"{path}: not a readable training checkpoint ({_first_line(exc)})") from None
    diffs = [d for d in config_differences(canonical_dict(TrainConfig, saved), to_dict(state.cfg))
             if d[0] not in RESUME_SAFE_KEYS]  # canonical: old key names/values (train.amp none) are no change
    if diffs:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diffs[:8]) + (
            f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        if not allow_config_change:
            raise ConfigError(f"{path}: this run was trained with another config: {shown}; resume with the "
                              f"run's own config, or allow the change (CLI --resume-force, "
                              f"train(..., allow_config_change=True))")
        state.warn(f"resume: continuing {path} with a changed config (allow_config_change): {shown}")
    return ckpt


def _resume(state: RunState, allow_config_change: bool = False) -> None:
    """Continue from ``run_dir/last.pt``: weights, optimizer, scaler, schedule, EMA, history, RNG.

    Raises:
        ConfigError: the checkpoint's config differs from this run's in keys that change training
            (all but :data:`RESUME_SAFE_KEYS`), unless ``allow_config_change``; or, allowed, its
            weights or optimizer state do not fit the new config (another model).
        DataError: ``last.pt`` is unreadable.
    """
    path = state.last_path
    ckpt = _read_last(state, allow_config_change)
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.scaler.load_state_dict(ckpt["scaler"])
        state.schedule.load_state_dict(ckpt["scheduler"])
        if state.ema is not None and ckpt.get("ema_state") is not None:
            state.ema.load_state_dict(ckpt["ema_state"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: its state does not fit the configured model/optimizer ({_first_line(exc)}); "
                          f"a different model cannot continue this run: train it in a new run folder") from None
    state.history = list(ckpt["history"])
    state.best_score, state.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
    state.bad_validations = int(ckpt["bad_validations"])
    state.epoch = int(ckpt["epoch"])
    state.guard = CollapseGuard.from_json(ckpt.get("collapse_guard"))  # absent (older version): a fresh guard
    if state.dist.main:
        _set_rng_state(ckpt["rng"])
    vv = state.run_dir / "val_volumes.jsonl"
    if state.dist.main and vv.is_file():  # drop rows of epochs after the checkpoint
        keep = [ln for ln in vv.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= state.epoch]
        with atomic_path(vv) as tmp:
            Path(tmp).write_text("".join(ln + "\n" for ln in keep))
    state.log(f"resumed {path} at epoch {state.epoch} (best {state.best_score} at epoch {state.best_epoch})")


def _wrap_ddp(state: RunState) -> None:
    """Under torchrun: train through a ``DistributedDataParallel`` wrapper of the model (``state.train_model``)."""
    if state.dist.world > 1:
        dev = state.device
        from ..models import NNUNet

        # without deep supervision an nnU-Net's lower-resolution heads take no part in the loss
        unused = isinstance(state.model, NNUNet) and not state.cfg.loss.deep_supervision
        state.train_model = nn.parallel.DistributedDataParallel(
            state.model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=unused)
