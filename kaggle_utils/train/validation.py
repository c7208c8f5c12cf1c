"""Validation on whole volumes and model selection.

:func:`validate_volumes` predicts each validation volume whole (``sliding_window_predict`` +
``postprocess``) and measures Dice on labelled voxels, the predicted foreground share, the local
competition score and the collapse verdict (:func:`validation_verdict`). After an epoch,
:func:`_validate_and_select` runs the small steps: :func:`_validate`, :func:`_select` (best score,
plateau), :func:`_guard_step` (the run's :class:`~kaggle_utils.collapse.CollapseGuard`) and
:func:`_patience_stop`. :func:`_write_oof` writes the out-of-fold probabilities at the end of a run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..collapse import CollapseVerdict
from ..data import IGNORE_LABEL, normalize_intensity, read_label, read_volume
from ..inference import InferenceConfig
from ..models import model_divisor
from ..probs import write_probs
from .config import TrainConfig, ValidationConfig
from .record import StopReason
from .state import RunState, _budget_spent, _plan_budget

__all__ = ["validate_volumes", "validation_verdict"]


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    valid = label != IGNORE_LABEL
    p = (pred != 0) & valid
    g = label == 1
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else float(2 * int((p & g).sum()) / denom)


def _validation_inference(cfg: TrainConfig) -> InferenceConfig:
    """The ``inference`` settings with the ``validation`` window, overlap and batch, no TTA, the
    training AMP and per-pass probabilities (what validation has always used)."""
    import dataclasses

    v = cfg.validation
    return dataclasses.replace(
        cfg.inference, patch_size=tuple(v.patch_size or cfg.sampler.patch_size), overlap=v.overlap,
        batch_size=v.batch_size, tta="none", amp=cfg.train.amp,
        ensemble="probs", channels_last=False,
    )


def _predict(model: nn.Module, image: np.ndarray, cfg: TrainConfig, device: torch.device,
             final: bool = False) -> np.ndarray:
    """Probabilities ``float32 (Z, Y, X)``: validation settings, or ``inference`` settings (TTA too) if ``final``.

    Both go through :func:`kaggle_utils.inference.predict_volume`, as ``predict`` does: out-of-fold
    probabilities (``final``) equal ``predict --save-probs`` of the same checkpoint and settings.
    """
    from ..inference import predict_volume

    x = normalize_intensity(image, mode=cfg.sampler.normalization)
    settings = cfg.inference if final else _validation_inference(cfg)
    return predict_volume(model, x, settings, device, pad_multiple=model_divisor(cfg.model))


def validation_verdict(rows: list[dict], vc: ValidationConfig) -> CollapseVerdict:
    """The collapse verdict of one validation alone (``collapse.collapse_verdict`` with the
    ``validation.collapse_*`` limits), from its per-volume rows (keys ``fg``, ``label_fg``: shares
    of labelled voxels predicted / labelled as surface; optional ``prob_std``)."""
    from ..collapse import collapse_verdict

    prob_std = [r["prob_std"] for r in rows] if all("prob_std" in r for r in rows) else None
    return collapse_verdict([r["fg"] for r in rows], [r["label_fg"] for r in rows], prob_std=prob_std,
                            max_ratio=vc.collapse_max_ratio, max_fg=vc.collapse_max_fg,
                            recover_ratio=vc.collapse_recover_ratio, under_ratio=vc.collapse_min_ratio)


def _read_pair(rec: Any, source: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 (Z, Y, X)`` image and label of ``rec``: from a prepared cache (``source``, a
    :class:`~kaggle_utils.prepare.PreparedVolumes`) when it holds the volume, else decoded from the TIFFs."""
    if source is not None and rec.id in source:
        return np.asarray(source.image(rec.id)), np.asarray(source.label(rec))
    return read_volume(rec.image_path), read_label(rec.label_path)


def _read_image(rec: Any, source: Any = None) -> np.ndarray:
    """``uint8 (Z, Y, X)`` image of ``rec``, from a prepared cache when it holds it (see :func:`_read_pair`)."""
    if source is not None and rec.id in source:
        return np.asarray(source.image(rec.id))
    return read_volume(rec.image_path)


def validate_volumes(model: nn.Module, records: list, cfg: TrainConfig, device: torch.device,
                     progress: bool = False, source: Any = None) -> tuple[dict, list[dict]]:
    """Validate on whole volumes: sliding window → postprocess → Dice / foreground share / score.

    Args:
        model: network (put in eval mode; the caller restores train mode).
        records: ``VolumeRecord`` s with labels.
        cfg: the run's :class:`TrainConfig` (``validation``, ``postprocess``, ``inference``).
        source: a prepared cache (:class:`~kaggle_utils.prepare.PreparedVolumes`) to read the volumes
            it holds from (memory-mapped, not decoded); ``None`` reads the TIFFs.

    Returns:
        ``(summary, per_volume)``: summary keys ``val_dice`` (mean over volumes, Dice of label 1 on
        voxels with label != 2), ``val_fg_pct`` / ``val_label_fg_pct`` (mean predicted / labelled
        surface share of labelled voxels, in %), ``val_score``, ``val_topo``, ``val_sd``, ``val_voi``
        (means over the first ``n_score`` volumes, ``None`` when 0), ``collapse`` (the kind of this
        validation's own verdict, :func:`validation_verdict`; :func:`train` replaces it with the
        run's :class:`~kaggle_utils.collapse.CollapseGuard` verdict), ``collapse_reasons``;
        per_volume one dict per volume with the same numbers.
    """
    from ..progress import progress_bar

    from ..collapse import fg_fraction, surface_share
    from ..metrics import score_volume
    from ..postprocess import postprocess

    rows: list[dict] = []
    for i, rec in enumerate(progress_bar(records, desc="validate", unit="vol", leave=False, enabled=progress)):
        image, label = _read_pair(rec, source)
        t_predict = time.monotonic()
        prob = _predict(model, image, cfg, device)
        t_predict = time.monotonic() - t_predict
        pred = postprocess(prob, cfg.postprocess)
        valid = label != IGNORE_LABEL
        row: dict[str, Any] = {
            "id": rec.id, "scroll_id": rec.scroll_id, "dice": _dice(pred, label),
            "fg": fg_fraction(pred, label), "label_fg": surface_share(label),
            "prob_std": float(prob[valid].std()) if valid.any() else float("nan"), "predict_s": t_predict,
        }
        if i < cfg.validation.n_score:
            s = score_volume(pred, label)
            row.update(score=float(s.score), topo=float(s.topo_score), sd=float(s.surface_dice), voi=float(s.voi_score))
        rows.append(row)
    verdict = validation_verdict(rows, cfg.validation)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        return float(np.mean(vals)) if vals else None

    summary = {
        "val_dice": mean("dice"), "val_score": mean("score"), "val_topo": mean("topo"), "val_sd": mean("sd"),
        "val_voi": mean("voi"), "val_fg_pct": 100 * (mean("fg") or 0.0),
        "val_fg_min_pct": 100 * min(r["fg"] for r in rows), "val_fg_max_pct": 100 * max(r["fg"] for r in rows),
        "val_label_fg_pct": 100 * (mean("label_fg") or 0.0), "val_prob_std": mean("prob_std"),
        "val_predict_s": float(sum(r["predict_s"] for r in rows)),
        "collapse": verdict.kind, "collapse_reasons": "; ".join(verdict.reasons),
    }
    return summary, rows


def _write_oof(model: nn.Module, records: list, cfg: TrainConfig, device: torch.device, run_dir: Path,
               fold: int, epoch: int | None, progress: bool, source: Any = None) -> Path:
    from ..progress import progress_bar

    oof = run_dir / "oof"
    oof.mkdir(parents=True, exist_ok=True)
    for rec in progress_bar(records, desc="oof", unit="vol", leave=False, enabled=progress):
        prob = _predict(model, _read_image(rec, source), cfg, device, final=True)
        write_probs(oof, rec.id, rec.scroll_id, prob, fold, fmt=cfg.validation.oof_format,
                    checkpoint="best.pt" if epoch is not None else "last.pt", epoch=epoch)
    return oof


# ----------------------------------------------------------------------------------------------
# After an epoch: validate, select, guard
# ----------------------------------------------------------------------------------------------


def _validation_due(state: RunState, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with a validation: every ``validation.every`` epochs, the last
    epoch, the end of a time budget, and a budgeted run's first epochs until one validation was timed.
    The same answer on every rank."""
    vc, tc = state.cfg.validation, state.cfg.train
    due = (epoch + 1) % vc.every == 0 or epoch + 1 == tc.epochs or state.budget_done
    return due or (state.budget is not None and not state.budget_planned)  # time one validation early


def _validate(state: RunState, epoch: int, row: dict) -> list[dict]:
    """Rank 0: validate the eval model (:func:`validate_volumes`), plan a budgeted run from its time, add the
    summary to ``row`` and append the per-volume rows to ``val_volumes.jsonl``; returns those rows."""
    t_val = time.monotonic()
    prepared = {"source": state.prepared} if state.prepared is not None else {}
    summary, per_volume = validate_volumes(state.eval_model, state.val_records, state.cfg, state.device,
                                           progress=state.progress, **prepared)
    _plan_budget(state, time.monotonic() - t_val, summary.get("val_predict_s"))
    state.model.train()
    row.update(summary)
    with open(state.run_dir / "val_volumes.jsonl", "a") as fh:
        fh.writelines(json.dumps({"epoch": epoch + 1, **v}) + "\n" for v in per_volume)
    return per_volume


def _select(state: RunState, epoch: int, row: dict) -> bool:
    """Model selection after a validation: the metric (competition score, or Dice when ``n_score`` is 0) in
    ``row["val_metric"]``, the best score and epoch, the count of validations without improvement, the
    ``plateau`` schedule fed. Returns whether this epoch is the new best."""
    cfg, vc = state.cfg, state.cfg.validation
    metric = row["val_score"] if vc.n_score > 0 and row["val_score"] is not None else row["val_dice"]
    row["val_metric"] = metric
    improved = False
    if metric is not None and (state.best_score is None or metric > state.best_score + vc.min_delta):
        state.best_score, state.best_epoch, improved, state.bad_validations = metric, epoch + 1, True, 0
    else:
        state.bad_validations += 1
    if cfg.optim.schedule == "plateau" and metric is not None:
        state.schedule.observe(metric)
    return improved


def _guard_step(state: RunState, epoch: int, row: dict, per_volume: list[dict]) -> StopReason | None:
    """The run's collapse guard after a validation: a flag latches until the ratio is back at or below the
    recovery limit. Adds ``collapse``, ``collapse_reasons`` and ``collapse_state`` to ``row``, warns when
    flagged; :attr:`StopReason.COLLAPSE` when ``validation.on_collapse`` is ``stop`` and the guard says stop."""
    vc = state.cfg.validation
    verdict = state.guard.update(validation_verdict(per_volume, vc), epoch + 1)
    row.update(collapse=verdict.kind, collapse_reasons="; ".join(verdict.reasons), collapse_state=state.guard.state)
    if verdict.collapsed:
        state.warn(f"collapse guard: epoch {epoch + 1}: {verdict.kind}: {row['collapse_reasons']} "
                   f"(predicted fg {row['val_fg_pct']:.2f}% vs labelled {row['val_label_fg_pct']:.2f}%; "
                   f"{state.guard.consecutive} flagged validation(s) in a row)")
        if (vc.on_collapse == "stop" and verdict.kind in vc.stop_kinds
                and state.guard.should_stop(vc.collapse_stop_after)):
            return StopReason.COLLAPSE
    elif state.guard.state == "recovered" and verdict.notes:
        state.log(f"collapse guard: epoch {epoch + 1}: {verdict.notes[-1]}")
    return None


def _patience_stop(state: RunState) -> StopReason | None:
    """:attr:`StopReason.EARLY_STOPPING` after ``validation.patience`` validations without improvement."""
    patience = state.cfg.validation.patience
    return StopReason.EARLY_STOPPING if patience is not None and state.bad_validations >= patience else None


def _share_rank0_plans(state: RunState) -> None:
    """Under torchrun: rank 0's ``plateau`` multiplier (it observed the score) and budget plan (it timed the
    validation) on every rank."""
    if state.dist.world > 1 and state.cfg.optim.schedule == "plateau":
        state.schedule.set_plateau_scale(state.dist.broadcast(state.schedule.plateau_scale))
    if state.dist.world > 1 and state.budget is not None:
        state.schedule.budget_s = state.dist.broadcast(float(state.schedule.budget_s or 0.0))


def _validate_and_select(state: RunState, epoch: int, row: dict) -> tuple[bool, StopReason | None]:
    """Validate after epoch ``epoch`` when due (rank 0: :func:`_validate`), keep the best score
    (:func:`_select`), run the collapse guard (:func:`_guard_step`) and early stopping. Returns
    ``(improved, stop reason: collapse / early stopping / None)``; the stop reason is rank 0's (see
    ``loop._agree_on_stop``)."""
    due = _validation_due(state, epoch)
    improved, reason = False, None
    if due and state.dist.main and state.val_records:
        per_volume = _validate(state, epoch, row)
        improved = _select(state, epoch, row)
        reason = _guard_step(state, epoch, row, per_volume) or _patience_stop(state)
    _share_rank0_plans(state)
    if due:
        state.budget_planned = True  # every rank: ``due`` must stay the same on all of them
        _budget_spent(state)  # a shorter plan may end the run now: after this epoch, validated
    return improved, reason
