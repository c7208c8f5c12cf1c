"""The training loop: :func:`train` (one fold) as a sequence of small steps around one
:class:`~kaggle_utils.train.state.RunState`: ``setup._set_up`` → ``setup._resume`` → per epoch
:func:`_train_epoch` (:func:`_train_step` per batch) → ``validation._validate_and_select`` →
:func:`_checkpoint` → :func:`_agree_on_stop` (a :class:`~kaggle_utils.train.record.StopReason`) →
:func:`_finish` (OOF, ``result.json``)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable

import torch

from ..config import ConfigError
from ..data import IGNORE_LABEL
from ..device import autocast, device_name
from ..models import save_checkpoint
from ..augment import augment_batch
from .config import LABEL_MODES, TrainConfig
from .dist import _Dist
from .record import StopReason, TrainResult, _attach_log_handlers, _detach_log_handlers, _epoch_line, \
    _write_metrics, logger
from .setup import _resume, _set_up, _wrap_ddp, check_fold, check_run_dir
from .state import RunState, _budget_end_line, _budget_spent, _epoch_seed, _out_of_time_before, _seed_everything
from .validation import _validate_and_select, _write_oof

__all__ = ["train", "apply_label_mode"]


def apply_label_mode(label: torch.Tensor, mode: str) -> torch.Tensor:
    """Map competition labels to training targets.

    Args:
        label: ``uint8 (B, 1, Z, Y, X)`` (any shape) with values {0, 1, 2}.
        mode: ``ignore`` (unchanged; the loss excludes label 2), ``foreground`` (``label > 0`` → 1)
            or ``background`` (2 → 0).

    Returns:
        ``uint8`` tensor of the same shape.
    """
    if mode == "ignore":
        return label
    if mode == "foreground":
        return (label > 0).to(torch.uint8)
    if mode == "background":
        return torch.where(label == IGNORE_LABEL, torch.zeros_like(label), label)
    raise ValueError(f"train.label_mode: must be one of {list(LABEL_MODES)}, got {mode!r}")


# stop reasons rank 0 decides after an epoch and broadcasts (their index goes over the wire)
_BROADCAST_REASONS: tuple[StopReason | None, ...] = (None, StopReason.COLLAPSE, StopReason.EARLY_STOPPING,
                                                     StopReason.CALLBACK)


def _train_step(state: RunState, i: int, image: torch.Tensor, label: torch.Tensor,
                aug_gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Forward/backward of batch ``i`` (``(B,1,Z,Y,X)`` float32 image, uint8 label); an optimizer,
    schedule and EMA step after every ``optim.accumulate`` batches. Returns the loss parts."""
    cfg, dev = state.cfg, state.device
    accumulate = cfg.optim.accumulate
    image = image.to(dev, non_blocking=True)
    label = label.to(dev, non_blocking=True)
    if cfg.train.augment:
        image, label = augment_batch(image, label, cfg.augment, aug_gen, cfg.sampler.ignore_label)
    if cfg.train.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    target = apply_label_mode(label, cfg.train.label_mode)
    last_micro = (i + 1) % accumulate == 0 or i + 1 == len(state.loader)
    no_sync = not last_micro and state.dist.world > 1
    with state.train_model.no_sync() if no_sync else contextlib.nullcontext():
        with autocast(dev, cfg.train.amp):
            out = state.train_model(image)  # one tensor, or one per decoder stage (deep supervision)
        logits = [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()
        total, parts = state.loss_fn(logits, target)
        state.scaler.scale(total / accumulate).backward()
    if last_micro:
        if cfg.optim.grad_clip is not None:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.optim.grad_clip)
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        state.schedule.step()
        if state.ema is not None:
            state.ema.update_parameters(state.model)
    return parts


def _train_epoch(state: RunState, epoch: int) -> dict | None:
    """Train epoch ``epoch`` (0-based); its metrics row (mean loss parts over ranks, lr), or ``None``
    when the time limit ran out inside it (every rank stops at the same batch)."""
    from ..progress import progress_bar

    tc, dist = state.cfg.train, state.dist
    seed = _epoch_seed(tc.seed, epoch, dist.rank)
    _seed_everything(seed)
    aug_gen = torch.Generator(device=state.device).manual_seed(seed + 1)
    state.dataset.set_epoch(epoch)
    state.train_model.train()
    names = state.part_names
    sums = {n: 0.0 for n in names}
    n_batches = 0
    state.optimizer.zero_grad(set_to_none=True)
    bar = progress_bar(state.loader, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", leave=False,
                       enabled=state.progress and dist.main)
    try:
        for i, (image, label, _meta) in enumerate(bar):
            if state.limit is not None and dist.broadcast_flag(int(time.monotonic() - state.t_start > state.limit)):
                state.log(f"time limit {state.limit:.0f}s reached inside epoch {epoch + 1}: abandoned it; "
                          f"last.pt holds epoch {epoch}")
                return None
            if _budget_spent(state):
                break
            parts = _train_step(state, i, image, label, aug_gen)
            for n in names:
                sums[n] += float(parts[n])
            n_batches += 1
            bar.set_postfix(loss=f"{sums['total'] / n_batches:.4f}")
    finally:
        bar.close()
    _budget_spent(state)  # a budget spent by the epoch's last batch ends the run after this epoch
    means = dist.mean({n: sums[n] / max(n_batches, 1) for n in names})
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": state.schedule.lr, "train_loss": means["total"]}
    row.update({f"train_{n}": means[n] for n in names if n != "total"})
    return row


def _checkpoint(state: RunState, row: dict, improved: bool) -> None:
    """Rank 0: ``last.pt`` (and ``best.pt`` when ``improved``), ``metrics.jsonl``/``.csv``, the epoch line."""
    if not state.dist.main:
        return
    ckpt = state.checkpoint_state(row)
    save_checkpoint(state.last_path, **ckpt)
    if improved:
        save_checkpoint(state.best_path, **ckpt)
    _write_metrics(state.run_dir, state.history)
    state.log(_epoch_line(row, state.cfg.train.epochs, state.part_names))


def _agree_on_stop(state: RunState, reason: StopReason | None) -> StopReason | None:
    """Rank 0's stop reason on every rank, logged once."""
    reason = _BROADCAST_REASONS[state.dist.broadcast_flag(_BROADCAST_REASONS.index(reason))]
    if reason is StopReason.COLLAPSE:
        state.log(f"stopping: the collapse guard flagged {state.guard.consecutive} validation(s) in a row up to "
                  f"epoch {state.epoch} (validation.collapse_stop_after {state.cfg.validation.collapse_stop_after}) "
                  f"and validation.on_collapse is 'stop'")
    elif reason is StopReason.EARLY_STOPPING:
        state.log(f"early stopping: no better validation score for {state.cfg.validation.patience} validation(s); "
                  f"best {state.best_score:.4f} at epoch {state.best_epoch}")
    return reason


def _run_epochs(state: RunState, on_epoch_end: Callable[[dict], bool | None] | None) -> None:
    """Epochs ``state.epoch + 1 .. train.epochs``: train, validate and select, checkpoint, decide to stop."""
    for epoch in range(state.epoch, state.cfg.train.epochs):
        if _out_of_time_before(state, epoch):
            state.stopped = StopReason.TIME_LIMIT
            return
        t_epoch = time.monotonic()
        row = _train_epoch(state, epoch)
        if row is None:
            state.stopped = StopReason.TIME_LIMIT
            return
        improved, reason = _validate_and_select(state, epoch, row)
        row["time_s"] = time.monotonic() - t_epoch
        state.history.append(row)
        state.epoch = epoch + 1
        _checkpoint(state, row, improved)
        state.epoch_times.append(time.monotonic() - t_epoch)
        if on_epoch_end is not None and on_epoch_end(dict(row)) and reason is None:
            reason = StopReason.CALLBACK
        reason = _agree_on_stop(state, reason)
        if reason is None and state.budget_done:
            reason = StopReason.TIME_BUDGET
            state.log(_budget_end_line(state))
        if reason is not None:
            state.stopped = reason
            return


def _best_text(state: RunState) -> str:
    """``best 0.6123 at epoch 7``, or what stands in for it when nothing was validated."""
    if state.best_score is None:
        return "no validation score (nothing validated): last.pt is the model"
    return f"best {state.best_score:.4f} at epoch {state.best_epoch}"


def _finish(state: RunState) -> TrainResult:
    """Out-of-fold probabilities from ``best.pt`` (rank 0, unless stopped by the time limit), the
    last log line and ``result.json``."""
    oof_dir = None
    if (state.dist.main and state.cfg.validation.write_oof and state.stopped is not StopReason.TIME_LIMIT
            and state.val_idx.records):
        eval_model = state.eval_model
        if state.best_path.is_file():
            from ..models import load_checkpoint

            eval_model, _, _ = load_checkpoint(state.best_path, map_location=state.device)
        oof_dir = _write_oof(eval_model, list(state.val_idx), state.cfg, state.device, state.run_dir, state.fold,
                             state.best_epoch, state.progress, source=state.prepared)
        state.log(f"wrote out-of-fold probabilities of {len(state.val_idx)} volume(s) to {oof_dir}")
    state.dist.barrier()
    state.log(f"fold {state.fold} finished ({state.stopped}) after {state.epoch} epoch(s); {_best_text(state)}")
    guard = state.guard
    if guard.history:  # the fold's last line: a run that was flagged says so, even when it looks healthy now
        (state.log if guard.state == "healthy" else state.warn)(f"fold {state.fold}: {guard.summary()}")
    result = TrainResult(state.run_dir, state.fold, state.epoch, state.best_epoch, state.best_score, state.stopped,
                         state.history, oof_dir, guard.state if guard.history else None,
                         guard.summary() if guard.history else None, guard.to_json())
    if state.dist.main:
        result.save()
    return result


def train(
    cfg: TrainConfig,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fold: int | str = 0,
    resume: bool = False,
    time_limit: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict], bool | None] | None = None,
    verbose: bool = True,
    allow_config_change: bool = False,
    time_budget: float | None = None,
    init_from: str | os.PathLike | None = None,
) -> TrainResult:
    """Train one fold; the function behind ``python -m kaggle_utils train`` and the notebooks.

    Args:
        cfg: the run's :class:`TrainConfig`.
        data_dir: competition-layout folder (``train.csv``, ``train_images/``, ``train_labels/``).
        out_dir: run folder (created); checkpoints, logs and OOF predictions go here.
        fold: validation fold in ``0 .. train.n_folds-1`` (scroll-grouped, ``data.split_fold``;
            with ``train.n_folds`` 1, fold 0 trains on every volume, nothing held out), or ``"all"``:
            every volume trained on, nothing held out (the final model of the winners), validated
            in-sample on ``validation.ids`` when listed.
        resume: continue from ``out_dir/last.pt`` exactly where it stopped (same weights, optimizer,
            scheduler, RNG and history as an uninterrupted run); starts fresh if there is none.
        time_limit: seconds this call may run (overrides ``train.time_limit_s``); the run stops
            before an epoch that would not fit, or abandons the current one, keeping ``last.pt``:
            a hard stop of a run meant to be resumed.
        time_budget: seconds the whole run may take (overrides ``train.time_budget_s``): the LR
            schedule follows the budget's elapsed fraction and the run ends inside it, finished
            (annealed, validated, ``best.pt``/``last.pt``, out-of-fold probabilities).
        init_from: start from this checkpoint's weights (overrides ``train.init_from``), new optimizer
            and schedule; any patch size.
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available (per-rank GPU under torchrun).
        progress: tqdm bars within epochs and validation.
        on_epoch_end: called with each epoch's metrics row after its checkpoint is written;
            returning ``True`` stops the run (``stopped="callback"``).
        verbose: also show the log lines (device, fold start/end, epoch lines, stop reason) on
            stdout, unless the ``kaggle_utils`` logger already writes to the console (the lines
            always go to ``train.log``).
        allow_config_change: with ``resume``, continue even when ``last.pt`` was trained with a
            config that differs in keys that change training (they are logged; e.g. more
            ``train.epochs`` stretch the cosine schedule). Without it such a resume is refused.

    Returns:
        :class:`TrainResult` (also written to ``out_dir/result.json``, see :meth:`TrainResult.load`).

    Raises:
        ConfigError: ``fold`` is not a fold of ``train.n_folds``; ``device`` names no usable device;
            a resume with another config (see ``allow_config_change``).
        DataError: bad data (a label outside {0, 1, 2}, fewer scrolls than folds, ...), in one line.
        OutputError: ``out_dir`` cannot be written or has no room for the checkpoints (before any work);
            ``DiskFullError`` also when a checkpoint write runs out of space (the previous one is kept).
    """
    t_start = time.monotonic()
    check_fold(fold, cfg.train.n_folds)
    cfg = _with_overrides(cfg, time_budget, init_from)
    run_dir = check_run_dir(cfg, out_dir)  # read-only, a file in the way, no room: one line, before any work
    dist = _Dist(device)
    handlers = _attach_log_handlers(run_dir, verbose) if dist.main else []
    try:
        dev = dist.device
        if dist.main:
            logger.info(f"fold {fold}: device {device_name(dev)}"
                        + (f" (rank 0 of {dist.world})" if dist.world > 1 else ""))
        limit = time_limit if time_limit is not None else cfg.train.time_limit_s
        state = _set_up(cfg, data_dir, run_dir, fold, dist, limit, t_start, progress)
        if resume and state.last_path.is_file():
            _resume(state, allow_config_change)
        elif resume:
            state.warn(f"--resume: no {state.last_path}, starting a fresh run")
        _wrap_ddp(state)
        _log_split(state)
        _run_epochs(state, on_epoch_end)
        return _finish(state)
    finally:
        _detach_log_handlers(handlers)
        dist.close()


def _log_split(state: RunState) -> None:
    """The run's data, batches and loss in one line; what a run without a held-out fold does in another."""
    fold, dist = state.fold, state.dist
    state.log(f"fold {fold}: {len(state.train_idx)} training volume(s), {len(state.val_idx)} validation "
              f"volume(s) ({len(state.val_records)} validated); {len(state.loader)} batch(es)/epoch x "
              f"{dist.world} rank(s) on {dist.device}; label_mode {state.cfg.train.label_mode}, "
              f"loss {state.loss_fn.weights}" + (" with deep supervision" if state.cfg.loss.deep_supervision else ""))
    if not state.val_idx.records:
        state.log(("--fold all" if fold == "all" else "train.n_folds 1") + ": no held-out fold; "
                  + (f"validating in-sample on validation.ids ({len(state.val_records)})" if state.val_records
                     else "no validation, early stopping, best.pt") + ", no out-of-fold predictions")


def _with_overrides(cfg: TrainConfig, time_budget: float | None, init_from: str | os.PathLike | None
                    ) -> TrainConfig:
    """``cfg`` with ``train.time_budget_s`` / ``train.init_from`` replaced when given (checked as in YAML)."""
    import dataclasses

    changes: dict[str, Any] = {}
    if time_budget is not None:
        changes["time_budget_s"] = float(time_budget)
    if init_from is not None:
        changes["init_from"] = str(init_from)
    if not changes:
        return cfg
    try:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
