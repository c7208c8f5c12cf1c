"""Training: one config-driven loop shared by the CLI (``python -m kaggle_utils train``) and notebooks.

``train(cfg, data_dir, out_dir, fold)`` trains one scroll-grouped fold:

* patches from :class:`~kaggle_utils.sampling.PatchDataset` (deterministic per ``(seed, epoch, i)``),
  optionally augmented, labels mapped by ``train.label_mode`` (``ignore``: label 2 excluded
  everywhere; ``foreground``: ``label > 0`` is surface, the original collapsing setup;
  ``background``: label 2 counts as background);
* AdamW/SGD with linear warmup then cosine or plateau decay, gradient clipping, accumulation,
  AMP (float16 with ``GradScaler`` or bfloat16) and an optional EMA of the weights;
* validation every ``validation.every`` epochs on *whole* validation volumes
  (``sliding_window_predict`` + ``postprocess``): Dice on labelled voxels, per-volume predicted
  foreground share, the local competition score (``metrics.score_volume``) on the first
  ``validation.n_score`` volumes, and the collapse guard (one ``collapse.CollapseGuard`` per
  fold: a flag latches until the run is back under the recovery limit, and the run's summary,
  last log line and ``result.json`` say whether it was ever flagged);
* ``RUN_DIR/last.pt`` and ``RUN_DIR/best.pt`` (best competition score) written atomically every
  epoch, with everything needed to resume exactly; ``train.log``, ``metrics.jsonl``, ``metrics.csv``
  (one row per epoch) and ``val_volumes.jsonl`` (one row per validated volume and validation);
* at the end, out-of-fold probabilities of the validation volumes from ``best.pt``, predicted with
  the ``inference`` settings (window, overlap, blending, TTA) as a submission would, in
  ``RUN_DIR/oof/`` (``{id}.npz`` with uint8 codes ``round(p * 255)``, or ``{id}.npy`` float16 ``(Z, Y, X)``
  with ``validation.oof_format: float16``; + ``{id}.json`` with ``id``, ``scroll_id``, ``fold``, ``shape``,
  ``epoch``; :mod:`kaggle_utils.probs`), for threshold/post-processing tuning.

Under ``torchrun --nproc_per_node N`` the same call uses DistributedDataParallel (NCCL on GPUs,
gloo on CPU): every rank draws its own patches, rank 0 validates, logs and writes checkpoints.
:func:`train_torchrun` launches ``python -m torch.distributed.run ... -m kaggle_utils train`` from a
notebook (both T4s) and streams its output there.

The run's log lines (device, fold start and end, one line per epoch with the loss parts, the
validation score and the collapse verdict, the stop reason) go to ``train.log`` and, with
``verbose`` (the default), to stdout, unless the ``kaggle_utils`` logger already writes to the
console: the same lines in a notebook as on the CLI, never twice.

A Kaggle session ends after 12 h: :func:`stage_resume` copies the ``fold{k}`` run folders of an
earlier session (attached as a read-only input) into the output folder, and ``train(...,
resume=True)`` continues them exactly. A resume with a config that differs in keys that change
training is refused (the keys are named) unless ``allow_config_change`` (CLI ``--resume-force``).

The loop is a sequence of small steps around one :class:`RunState` (model, optimizer, scaler,
EMA, :class:`LRSchedule`, history, best score/epoch, epoch counter, stop reason):
``_set_up`` (data split, label pre-check, loader, model...) → ``_resume`` → per epoch
``_train_epoch`` (``_train_step`` per batch) → ``_validate_and_select`` → ``_checkpoint`` →
``_agree_on_stop`` (a :class:`StopReason`) → ``_finish`` (OOF, ``result.json``). The config
dataclasses live in :mod:`kaggle_utils.train_config` and are importable from here.

Bad input stops the run with one line: a fold outside ``train.n_folds``
(:class:`~kaggle_utils.config.ConfigError`), an unusable device, a label outside {0, 1, 2}
(:class:`~kaggle_utils.data.DataError`; found by the ``train.check_labels`` pre-check, or by a
DataLoader worker, re-raised with the same line).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import enum
import io
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .config import ConfigError, canonical_dict, to_dict
from .data import IGNORE_LABEL, DataError, atomic_path, load_index, normalize_intensity, read_label, read_volume, \
    make_folds, split_fold
from .collapse import CollapseGuard, CollapseVerdict
from .device import autocast, check_gpu_supported, device_name, resolve_amp_dtype, resolve_device, warn_slow_conv3d_amp
from .inference import InferenceConfig
from .losses import build_loss
from .models import build_model, model_divisor, save_checkpoint, set_deep_supervision
from .probs import write_probs
from .sampling import PatchDataset, augment_batch, check_labels, default_cache, make_loader
from .train_config import LABEL_MODES, LoopConfig, OptimConfig, TrainConfig, ValidationConfig, load_train_config

__all__ = [
    "LABEL_MODES",
    "OptimConfig",
    "LoopConfig",
    "ValidationConfig",
    "TrainConfig",
    "TrainResult",
    "StopReason",
    "RunState",
    "RESUME_SAFE_KEYS",
    "load_train_config",
    "apply_label_mode",
    "LRSchedule",
    "WarmupSchedule",
    "validate_volumes",
    "validation_verdict",
    "check_fold",
    "split_train_val",
    "assign_folds",
    "config_differences",
    "resolve_device",
    "train",
    "train_folds",
    "device_name",
    "stage_resume",
    "torchrun_command",
    "train_torchrun",
]

logger = logging.getLogger(__name__)
_PACKAGE_LOGGER = logging.getLogger(__name__.rpartition(".")[0])  # "kaggle_utils": other modules' warnings too


class StopReason(str, enum.Enum):
    """Why a run ended. The values are the strings of ``TrainResult.stopped``, ``result.json`` and
    the log lines (a member compares equal to its string)."""

    COMPLETED = "completed"
    EARLY_STOPPING = "early_stopping"
    COLLAPSE = "collapse"
    TIME_LIMIT = "time_limit"
    CALLBACK = "callback"
    TIME_BUDGET = "time_budget"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


# ----------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------


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


#: With a time budget the warm-up ends by this share of the training phase at the latest (however
#: few steps that is), so that the rest of the budget anneals: a budget shorter than
#: ``optim.warmup_epochs`` ended at 94 % of the peak LR before (issue 25).
BUDGET_WARMUP_SHARE = 0.1


class LRSchedule:
    """The whole learning-rate schedule, stepped once per optimizer step: linear warmup, then
    cosine, poly, plateau or constant (``optim.schedule``).

    ``lr(step) = base_lr * factor``; warmup rises from 1 % to 100 % over ``warmup_steps``; cosine
    then decays to ``min_lr_ratio`` at ``total_steps``; poly is nnU-Net's ``(1 - t)^poly_exponent``
    (0 at the end); plateau multiplies by ``plateau_factor`` each time :meth:`observe` sees
    ``plateau_patience`` validations without improvement.

    With ``budget_s`` (a time budget for the training phase) ``t``, the fraction of the run done, is
    the elapsed fraction of the budget (:meth:`elapsed`, carried across resumes) instead of
    ``step / total_steps``, and the warm-up ends by :data:`BUDGET_WARMUP_SHARE` of the budget at
    the latest (:meth:`warmup_done`). Has ``state_dict``/``load_state_dict`` of plain numbers for checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int,
                 budget_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.optimizer = optimizer
        self.cfg = cfg
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.total_steps = max(1, steps_per_epoch * epochs)
        self.budget_s = budget_s
        self.clock = clock
        self.elapsed_before = 0.0
        self.t0 = clock()
        self.step_count = 0
        self.plateau_scale = 1.0
        self.plateau_best = -math.inf
        self.plateau_bad = 0
        self._apply()

    def elapsed(self) -> float:
        """Seconds this schedule has run, earlier sessions of a resumed run included."""
        return self.elapsed_before + self.clock() - self.t0

    def fraction(self, step: int | None = None) -> float:
        """``t`` in [0, 1]: the budget's elapsed fraction, or the share of post-warmup steps done."""
        if self.budget_s is not None:
            return min(1.0, max(0.0, self.elapsed() / self.budget_s))
        s = self.step_count if step is None else step
        return min(1.0, max(0.0, (s - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))

    def warmup_done(self, step: int | None = None) -> float:
        """Share of the warm-up done, in [0, 1]: steps over ``warmup_steps``; with a budget, also the
        elapsed time over :data:`BUDGET_WARMUP_SHARE` of it, whichever is further (a short budget
        still warms up, then anneals, instead of ending inside a warm-up counted in steps)."""
        if self.warmup_steps <= 0:
            return 1.0
        done = (self.step_count if step is None else step) / self.warmup_steps
        if self.budget_s is not None:
            done = max(done, self.elapsed() / (BUDGET_WARMUP_SHARE * max(self.budget_s, 1e-9)))
        return min(1.0, done)

    def factor(self, step: int | None = None) -> float:
        """Multiplier of ``optim.lr`` at optimizer step ``step`` (default: the current one)."""
        s = self.step_count if step is None else step
        c = self.cfg
        warm = self.warmup_done(s)
        if warm < 1.0:
            return 0.01 + 0.99 * warm
        if c.schedule == "cosine":
            t = self.fraction(s)
            return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if c.schedule == "poly":
            return (1.0 - self.fraction(s)) ** c.poly_exponent
        if c.schedule == "plateau":
            return max(c.min_lr_ratio, self.plateau_scale)
        return 1.0

    def set_plateau_scale(self, scale: float) -> None:
        """Set the ``plateau`` multiplier (e.g. rank 0's, under torchrun) and apply it."""
        self.plateau_scale = float(scale)
        self._apply()

    def _apply(self) -> None:
        lr = self.cfg.lr * self.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def observe(self, score: float) -> None:
        """Feed a validation score (higher is better) to the ``plateau`` schedule."""
        if score > self.plateau_best:
            self.plateau_best, self.plateau_bad = score, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad >= self.cfg.plateau_patience:
                self.plateau_scale *= self.cfg.plateau_factor
                self.plateau_bad = 0
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "plateau_scale": self.plateau_scale,
                "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad, "elapsed": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.elapsed_before, self.t0 = float(state.get("elapsed", 0.0)), self.clock()
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
        self._apply()


class WarmupSchedule(LRSchedule):
    """Deprecated name of :class:`LRSchedule` (it is the whole schedule, not only its warmup)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
        warnings.warn("kaggle_utils.train.WarmupSchedule is deprecated; use LRSchedule", DeprecationWarning,
                      stacklevel=2)
        super().__init__(optimizer, cfg, steps_per_epoch, epochs)


def _build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank, 0x7EA1]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


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
    from .inference import predict_volume

    x = normalize_intensity(image, mode=cfg.sampler.normalization)
    settings = cfg.inference if final else _validation_inference(cfg)
    return predict_volume(model, x, settings, device, pad_multiple=model_divisor(cfg.model))


def validation_verdict(rows: list[dict], vc: ValidationConfig) -> CollapseVerdict:
    """The collapse verdict of one validation alone (``collapse.collapse_verdict`` with the
    ``validation.collapse_*`` limits), from its per-volume rows (keys ``fg``, ``label_fg``: shares
    of labelled voxels predicted / labelled as surface; optional ``prob_std``)."""
    from .collapse import collapse_verdict

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
    from .progress import progress_bar

    from .collapse import fg_fraction, surface_share
    from .metrics import score_volume
    from .postprocess import postprocess

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


# ----------------------------------------------------------------------------------------------
# Run bookkeeping
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        run_dir: the run folder (``last.pt``, ``best.pt``, ``train.log``, ``metrics.*``, ``oof/``).
        fold: validation fold, or ``"all"``.
        epochs_completed: epochs finished (counting those of a resumed run).
        best_epoch: epoch (1-based) of ``best.pt``; ``None`` before any validation.
        best_score: its selection metric (competition score, or Dice when ``n_score`` is 0).
        stopped: a :class:`StopReason`: ``completed``, ``early_stopping``, ``collapse``,
            ``time_limit`` or ``callback`` (equal to those strings).
        history: one dict per epoch (the rows of ``metrics.jsonl``).
        oof_dir: folder of the out-of-fold probabilities, or ``None``.
        collapse: the run's collapse state at the end (``CollapseGuard.state``): ``healthy`` (never
            flagged), ``collapsed`` (flagged at the last validation) or ``recovered`` (flagged
            earlier); ``None`` when nothing was validated (or in a ``result.json`` of an older version).
        collapse_summary: ``CollapseGuard.summary()``: one line naming the flagged epochs, if any
            (``None`` when ``collapse`` is).
        collapse_guard: ``CollapseGuard.to_json()`` (every validation's kind, ratio and state).
    """

    run_dir: Path
    fold: int | str
    epochs_completed: int
    best_epoch: int | None
    best_score: float | None
    stopped: StopReason | str
    history: list[dict] = field(default_factory=list)
    oof_dir: Path | None = None
    collapse: str | None = None
    collapse_summary: str | None = None
    collapse_guard: dict | None = None

    def __str__(self) -> str:
        best = ("no validation score, last.pt is the model" if self.best_score is None
                else f"best {self.best_score:.4f} at epoch {self.best_epoch}")
        text = f"fold {self.fold}: {self.stopped} after {self.epochs_completed} epoch(s), {best}; {self.run_dir}"
        return text + (f"\n  {self.collapse_summary}" if self.collapse_summary else "")

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.pt"

    def save(self) -> Path:
        """Write ``run_dir/result.json`` (everything but ``history``, which is ``metrics.jsonl``), atomically."""
        data = {"fold": self.fold, "epochs_completed": self.epochs_completed, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "stopped": self.stopped,
                "oof_dir": None if self.oof_dir is None else str(Path(self.oof_dir).resolve()),
                "collapse": self.collapse, "collapse_summary": self.collapse_summary,
                "collapse_guard": self.collapse_guard}
        path = Path(self.run_dir) / "result.json"
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "TrainResult":
        """The result of a finished run from its folder (``result.json`` + ``metrics.jsonl``).

        Raises:
            DataError: ``result.json`` is missing (the run did not finish) or unreadable.
        """
        run_dir = Path(run_dir)
        path = run_dir / "result.json"
        try:
            data = json.loads(path.read_text())
            history = []
            if (run_dir / "metrics.jsonl").is_file():
                history = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            fold = data["fold"] if data["fold"] == "all" else int(data["fold"])
            guard = data.get("collapse_guard")
            if guard is not None and not isinstance(guard, dict):
                raise TypeError(f"collapse_guard is a {type(guard).__name__}, not an object")
            return cls(run_dir, fold, int(data["epochs_completed"]), data["best_epoch"],
                       data["best_score"], _stop_reason(str(data["stopped"])), history,
                       Path(data["oof_dir"]) if data.get("oof_dir") else None,
                       data.get("collapse"), data.get("collapse_summary"), guard)
        except FileNotFoundError:
            raise DataError(f"{path}: missing; the run in {run_dir} did not finish (see its train.log)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"


def _stop_reason(value: str) -> StopReason | str:
    try:
        return StopReason(value)
    except ValueError:  # written by another version: keep the string
        return value


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    with atomic_path(run_dir / "metrics.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in history))
    keys: list[str] = []
    for r in history:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    with atomic_path(run_dir / "metrics.csv") as tmp:
        Path(tmp).write_text(buf.getvalue())


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _epoch_line(row: dict, epochs: int, part_names: list[str]) -> str:
    parts = ", ".join(f"{n} {row['train_' + n]:.4f}" for n in part_names if n != "total")
    line = (f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f} ({parts}) lr {row['lr']:.2e} "
            f"{row['time_s']:.1f}s")
    if "val_dice" in row:
        line += (f" | val dice {_fmt(row['val_dice'], '.4f')} score {_fmt(row['val_score'], '.4f')} "
                 f"(topo {_fmt(row['val_topo'], '.3f')} sd {_fmt(row['val_sd'], '.3f')} voi {_fmt(row['val_voi'], '.3f')}) "
                 f"fg {row['val_fg_pct']:.2f}% [{row['val_fg_min_pct']:.2f}-{row['val_fg_max_pct']:.2f}% per volume] "
                 f"(labelled {row['val_label_fg_pct']:.2f}%) [{row['collapse']}]")
        if row.get("collapse_state") == "recovered":
            line += " (run flagged earlier, recovered)"
    return line


_CONSOLE_STREAMS = ("stdout", "stderr", "__stdout__", "__stderr__")


def _shows_on_console(log: logging.Logger) -> bool:
    """Whether a record of ``log`` already reaches a handler writing to stdout/stderr."""
    streams = [getattr(sys, name, None) for name in _CONSOLE_STREAMS]
    node: logging.Logger | None = log
    while node is not None:
        for h in node.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and any(h.stream is st for st in streams if st is not None):
                return True
        node = node.parent if node.propagate else None
    return False


class _Dist:
    """Rank/world of a ``torchrun`` launch (or a single process)."""

    def __init__(self, device: str | torch.device | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")) if self.world > 1 else None)
        self.owns_group = False
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                # rank 0 validates whole volumes while the others wait: allow long waits
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(hours=3))
                self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(t, 0)
        return float(t.item())

    def broadcast_flag(self, value: int) -> int:
        """Rank 0's integer ``value`` on every rank."""
        return int(round(self.broadcast(float(value))))

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _write_oof(model: nn.Module, records: list, cfg: TrainConfig, device: torch.device, run_dir: Path,
               fold: int, epoch: int | None, progress: bool, source: Any = None) -> Path:
    from .progress import progress_bar

    oof = run_dir / "oof"
    oof.mkdir(parents=True, exist_ok=True)
    for rec in progress_bar(records, desc="oof", unit="vol", leave=False, enabled=progress):
        prob = _predict(model, _read_image(rec, source), cfg, device, final=True)
        write_probs(oof, rec.id, rec.scroll_id, prob, fold, fmt=cfg.validation.oof_format,
                    checkpoint="best.pt" if epoch is not None else "last.pt", epoch=epoch)
    return oof


# ----------------------------------------------------------------------------------------------
# The loop: one run state, small steps
# ----------------------------------------------------------------------------------------------


# stop reasons rank 0 decides after an epoch and broadcasts (their index goes over the wire)
_BROADCAST_REASONS: tuple[StopReason | None, ...] = (None, StopReason.COLLAPSE, StopReason.EARLY_STOPPING,
                                                     StopReason.CALLBACK)

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


@dataclass
class RunState:
    """Everything one fold's training carries from epoch to epoch; the steps of :func:`train`
    (:func:`_set_up`, :func:`_resume`, :func:`_train_epoch`, :func:`_validate_and_select`,
    :func:`_checkpoint`, :func:`_finish`) read and update it.

    Attributes:
        cfg, fold, run_dir, dist: the run's config, validation fold, folder and ranks.
        train_idx, val_idx, val_records: training volumes, held-out volumes, and those validated.
        dataset, loader: patches of ``train_idx`` (:class:`PatchDataset`, :class:`PatchLoader`).
        model, train_model: the network, and what the batches go through (``model`` or its DDP wrapper).
        loss_fn, optimizer, schedule, scaler, ema: loss, optimizer, :class:`LRSchedule`, AMP
            ``GradScaler`` and the optional ``AveragedModel`` of the weights.
        epoch: epochs completed (the next epoch to train is ``epoch + 1``, 1-based).
        history: one metrics row per completed epoch.
        best_score, best_epoch, bad_validations: model selection and early stopping.
        guard: the run's :class:`~kaggle_utils.collapse.CollapseGuard` (rank 0 updates it after
            each validation; saved in ``last.pt``, ``best.pt`` and ``result.json``).
        stopped: why the run ended (:class:`StopReason`).
        t_start, limit, epoch_times: the time limit of this call (``time.monotonic`` seconds).
        budget, budget_done: ``train.time_budget_s`` of the whole run and whether its training
            phase is over (see :func:`_budget_spent`).
        budget_planned: whether a validation of this call has been timed (:func:`_plan_budget`); a
            budgeted run validates after its first epoch until one has, so that the final validation
            and out-of-fold pass are planned from a measurement, not from ``train.budget_reserve``.
        progress: tqdm bars.
        prepared: the prepared cache (:class:`~kaggle_utils.prepare.PreparedVolumes`) patches, validation and
            out-of-fold volumes are read from (``sampler.prepared``), or ``None``.
        memory: the run's :class:`~kaggle_utils.memory.MemoryPlan` (printed at start).
    """

    cfg: TrainConfig
    fold: int | str
    run_dir: Path
    dist: "_Dist"
    train_idx: Any
    val_idx: Any
    val_records: list
    dataset: PatchDataset
    loader: Any
    model: nn.Module
    train_model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: "LRSchedule"
    scaler: Any
    ema: Any | None
    t_start: float
    limit: float | None
    progress: bool = True
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    bad_validations: int = 0
    guard: CollapseGuard = field(default_factory=CollapseGuard)
    stopped: StopReason = StopReason.COMPLETED
    epoch_times: list[float] = field(default_factory=list)
    budget: float | None = None
    budget_done: bool = False
    budget_planned: bool = False
    prepared: Any = None
    memory: Any = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def part_names(self) -> list[str]:
        """The loss parts logged per epoch, ``total`` last."""
        return list(self.loss_fn.weights) + ["total"]

    @property
    def eval_model(self) -> nn.Module:
        """What validation predicts with: the EMA weights when kept."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def log(self, message: str) -> None:
        """An info line in ``train.log`` (and on stdout), rank 0 only."""
        if self.dist.main:
            logger.info(message)

    def warn(self, message: str) -> None:
        if self.dist.main:
            logger.warning(message)

    def checkpoint_state(self, row: dict) -> dict:
        """The contents of ``last.pt`` / ``best.pt`` after the epoch of ``row``."""
        ema = self.ema
        return dict(
            model=self.model.state_dict(), ema=ema.module.state_dict() if ema is not None else None,
            ema_state=ema.state_dict() if ema is not None else None,
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            scheduler=self.schedule.state_dict(), rng=_rng_state(), epoch=self.epoch, fold=self.fold,
            config=to_dict(self.cfg), model_config=to_dict(self.cfg.model), metrics=row, history=self.history,
            best_score=self.best_score, best_epoch=self.best_epoch, bad_validations=self.bad_validations,
            collapse_guard=self.guard.to_json(),
        )


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (torch's load errors run over many lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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


def _open_prepared(cfg: TrainConfig, train_idx: Any, val_idx: Any, dist: _Dist) -> Any:
    """The prepared cache of ``sampler.prepared`` checked against the data folder (every training volume
    prepared, from the same TIFFs; held-out volumes it lacks are read from the TIFFs), or ``None``."""
    if not cfg.sampler.prepared:
        return None
    from .prepare import open_prepared

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
    from .memory import (MemoryBudgetError, budget_bytes, plan_train_memory, read_machine_memory,
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
    optimizer = _build_optimizer(model, cfg.optim)
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
    from .outputs import check_output

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
    from .config import from_dict
    from .models import ModelConfig, _torch_load, describe_model

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
    if state.dist.world > 1:
        dev = state.device
        from .models import NNUNet

        # without deep supervision an nnU-Net's lower-resolution heads take no part in the loss
        unused = isinstance(state.model, NNUNet) and not state.cfg.loss.deep_supervision
        state.train_model = nn.parallel.DistributedDataParallel(
            state.model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=unused)


def _out_of_time_before(state: RunState, epoch: int) -> bool:
    """Whether the next epoch would not fit the time limit (the longest epoch so far); same on every rank."""
    late = (state.limit is not None and bool(state.epoch_times)
            and time.monotonic() - state.t_start + max(state.epoch_times) > state.limit)
    if state.dist.broadcast_flag(int(late)):
        state.log(f"time limit {state.limit:.0f}s: stopping before epoch {epoch + 1} (last.pt holds epoch {epoch})")
        return True
    return False


def _budget_spent(state: RunState) -> bool:
    """Whether the training phase of ``train.time_budget_s`` is over (the schedule's budget reached);
    sets ``state.budget_done``; the same answer on every rank."""
    if state.budget is None or state.budget_done:
        return state.budget_done
    sched = state.schedule
    state.budget_done = bool(state.dist.broadcast_flag(int(sched.elapsed() >= (sched.budget_s or 0.0))))
    return state.budget_done


def _plan_budget(state: RunState, val_seconds: float, predict_seconds: float | None = None) -> None:
    """Shorten the training phase of a budgeted run when a measured validation says that the final
    validation, checkpoints and out-of-fold predictions need more than ``train.budget_reserve``.

    The estimate: one validation (``val_seconds``), plus the out-of-fold pass over every held-out
    volume from the validation's network time (``predict_seconds``; default ``val_seconds``, which
    also holds reading, post-processing and scoring) with the ``inference`` TTA passes and overlap,
    plus 30 % slack. Rank 0 measures; every rank gets its plan.
    """
    if state.budget is None:
        return
    from .inference import tta_transforms

    cfg = state.cfg
    n_val = max(1, len(state.val_records))
    overlap_cost = ((1 - cfg.validation.overlap) / (1 - cfg.inference.overlap)) ** 3
    oof = 0.0
    if cfg.validation.write_oof:
        per_volume = (val_seconds if predict_seconds is None else predict_seconds) / n_val
        oof = per_volume * len(state.val_idx) * len(tta_transforms(cfg.inference.tta)) * overlap_cost
    reserve = max(cfg.train.budget_reserve * state.budget, 1.3 * (val_seconds + oof))
    state.schedule.budget_s = max(0.05 * state.budget, state.budget - reserve)
    if state.budget - reserve < 0.05 * state.budget:
        state.warn(f"time budget {state.budget:.0f}s: the final validation and out-of-fold pass alone need about "
                   f"{reserve:.0f}s (estimated from the validation just timed); the run will end after the budget "
                   f"(give a longer one)")


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
    from .progress import progress_bar

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


def _validate_and_select(state: RunState, epoch: int, row: dict) -> tuple[bool, StopReason | None]:
    """Validate after epoch ``epoch`` when due (rank 0), add the numbers to ``row``, keep the best
    score, feed the plateau schedule. Returns ``(improved, stop reason: collapse / early stopping / None)``."""
    cfg, vc = state.cfg, state.cfg.validation
    due = (epoch + 1) % vc.every == 0 or epoch + 1 == cfg.train.epochs or state.budget_done
    due = due or (state.budget is not None and not state.budget_planned)  # time one validation early
    improved, reason = False, None
    if due and state.dist.main and state.val_records:
        t_val = time.monotonic()
        prepared = {"source": state.prepared} if state.prepared is not None else {}
        summary, per_volume = validate_volumes(state.eval_model, state.val_records, cfg, state.device,
                                               progress=state.progress, **prepared)
        _plan_budget(state, time.monotonic() - t_val, summary.get("val_predict_s"))
        state.model.train()
        row.update(summary)
        with open(state.run_dir / "val_volumes.jsonl", "a") as fh:
            fh.writelines(json.dumps({"epoch": epoch + 1, **v}) + "\n" for v in per_volume)
        metric = summary["val_score"] if vc.n_score > 0 and summary["val_score"] is not None else summary["val_dice"]
        row["val_metric"] = metric
        if metric is not None and (state.best_score is None or metric > state.best_score + vc.min_delta):
            state.best_score, state.best_epoch, improved, state.bad_validations = metric, epoch + 1, True, 0
        else:
            state.bad_validations += 1
        if cfg.optim.schedule == "plateau" and metric is not None:
            state.schedule.observe(metric)
        # the run's verdict: a flag latches until the ratio is back at or below the recovery limit
        verdict = state.guard.update(validation_verdict(per_volume, vc), epoch + 1)
        row.update(collapse=verdict.kind, collapse_reasons="; ".join(verdict.reasons),
                   collapse_state=state.guard.state)
        if verdict.collapsed:
            state.warn(f"collapse guard: epoch {epoch + 1}: {verdict.kind}: {row['collapse_reasons']} "
                       f"(predicted fg {summary['val_fg_pct']:.2f}% vs labelled {summary['val_label_fg_pct']:.2f}%; "
                       f"{state.guard.consecutive} flagged validation(s) in a row)")
            if (vc.on_collapse == "stop" and verdict.kind in vc.stop_kinds
                    and state.guard.should_stop(vc.collapse_stop_after)):
                reason = StopReason.COLLAPSE
        elif state.guard.state == "recovered" and verdict.notes:
            state.log(f"collapse guard: epoch {epoch + 1}: {verdict.notes[-1]}")
        if reason is None and vc.patience is not None and state.bad_validations >= vc.patience:
            reason = StopReason.EARLY_STOPPING
    if state.dist.world > 1 and cfg.optim.schedule == "plateau":  # rank 0 observed the score
        state.schedule.set_plateau_scale(state.dist.broadcast(state.schedule.plateau_scale))
    if state.dist.world > 1 and state.budget is not None:  # rank 0 measured the validation
        state.schedule.budget_s = state.dist.broadcast(float(state.schedule.budget_s or 0.0))
    if due:
        state.budget_planned = True  # every rank: ``due`` must stay the same on all of them
        _budget_spent(state)  # a shorter plan may end the run now: after this epoch, validated
    return improved, reason


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


def _budget_end_line(state: RunState) -> str:
    """Where a budgeted run's training phase ended, and what the rest of the budget is for (only
    what this run does: a run without a held-out fold neither validates nor writes OOF predictions)."""
    sched = state.schedule
    head = (f"time budget {state.budget:.0f}s: training phase ended at {sched.elapsed():.0f}s (planned "
            f"{sched.budget_s:.0f}s, lr factor {sched.factor():.3f}) after epoch {state.epoch}")
    oof = state.cfg.validation.write_oof and bool(state.val_idx.records)
    if state.val_records:
        return head + (", validated; the rest of the budget is for out-of-fold predictions" if oof
                       else ", validated")
    return head + "; no validation or out-of-fold predictions (nothing held out): last.pt is the model"


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
            from .models import load_checkpoint

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


def _attach_log_handlers(run_dir: Path, verbose: bool) -> list[logging.Handler]:
    """Rank 0: ``train.log`` for the ``kaggle_utils`` logger (other modules' warnings too), and
    stdout when ``verbose`` and nothing shows the lines on the console yet."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handlers: list[logging.Handler] = [handler]
    if verbose and not _shows_on_console(logger):
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(console)
    for h in handlers:
        _PACKAGE_LOGGER.addHandler(h)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    return handlers


def _detach_log_handlers(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        _PACKAGE_LOGGER.removeHandler(h)
        h.close()


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


def fold_budget(run_budget: float | None, n_folds: int) -> float | None:
    """Seconds of ``train.time_budget_s`` (or ``--time-budget``) each of ``n_folds`` folds trained in
    turn gets when the budget is the whole run's: an equal share (``None``: no budget). Equal and
    fixed, so that a resumed fold sees the budget it started with (a fold that ends early leaves its
    rest unused)."""
    if run_budget is None:
        return None
    return float(run_budget) / max(1, n_folds)


def budget_split_line(run_budget: float, folds: list[int]) -> str:
    """The log line that says how a whole run's time budget was split between ``folds``."""
    share = fold_budget(run_budget, len(folds))
    return (f"time budget {run_budget:.0f}s for the whole run of {len(folds)} fold(s) {folds}: {share:.0f}s per fold "
            f"(each fold's schedule is planned and annealed inside its share)")


def train_folds(cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                folds: list[int] | None = None, **kwargs: Any) -> list[TrainResult]:
    """Train several folds in turn (default: all ``train.n_folds``), each in ``out_dir/fold{k}``.

    A shared ``time_limit`` is split between what is left: each fold gets the remaining time. A
    ``time_budget`` (default ``train.time_budget_s``) is the whole run's: each fold plans its run
    inside an equal share (:func:`fold_budget`), said in one log line (also ``out_dir/train.log``).
    """
    folds = list(range(cfg.train.n_folds)) if folds is None else folds
    limit = kwargs.pop("time_limit", None)
    run_budget = kwargs.pop("time_budget", None)
    run_budget = cfg.train.time_budget_s if run_budget is None else run_budget
    if run_budget is not None and int(os.environ.get("RANK", "0")) == 0:
        handlers = _attach_log_handlers(Path(out_dir), kwargs.get("verbose", True))
        try:
            logger.info(budget_split_line(run_budget, folds))
        finally:
            _detach_log_handlers(handlers)
    t0 = time.monotonic()
    results = []
    for k in folds:
        left = None if limit is None else max(0.0, limit - (time.monotonic() - t0))
        results.append(train(cfg, data_dir, Path(out_dir) / f"fold{k}", fold=k, time_limit=left,
                             time_budget=fold_budget(run_budget, len(folds)), **kwargs))
        if results[-1].stopped == "time_limit":
            break
    return results


# ----------------------------------------------------------------------------------------------
# Kaggle sessions: continue an earlier session's runs; both GPUs with torchrun
# ----------------------------------------------------------------------------------------------


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise DataError(f"{path}: not a readable training checkpoint ({_first_line(exc)})") from None


def _copy_run_folder(src: Path, dst: Path) -> None:
    """Copy a run folder's files (contents only: the copies are writable even from a read-only input)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.is_file() and not path.name.startswith("."):  # skip leftovers of interrupted atomic writes
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)


def stage_resume(source: str | os.PathLike, out_dir: str | os.PathLike, folds: list[int]) -> list[Path]:
    """Copy an earlier session's run folders into ``out_dir`` so that ``train(..., resume=True)`` continues them.

    Kaggle inputs are read-only and a session lasts at most 12 h: attach the earlier session's
    output as an input, then for each fold ``k`` this finds ``fold{k}/last.pt`` anywhere under
    ``source`` and copies that whole run folder (``last.pt``, ``best.pt``, logs, metrics) to
    ``out_dir/fold{k}``, where training resumes. Where several inputs hold the fold, the
    checkpoint with the most epochs wins. A fold already in ``out_dir`` with at least as many
    epochs is left as it is.

    Args:
        source: folder to search (e.g. ``/kaggle/input``), or one run folder holding ``last.pt``
            directly (then ``folds`` must name one fold).
        out_dir: the writable output folder of this session (``OUT_DIR``).
        folds: fold numbers to look for.

    Returns:
        ``out_dir/fold{k}`` of every fold that now has a ``last.pt`` to resume from (folds
        without a checkpoint under ``source`` are left out: they start fresh).

    Raises:
        DataError: ``source`` does not exist, or a checkpoint found is unreadable.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise DataError(f"{source}: no such folder to resume from")
    if (source / "last.pt").is_file():
        if len(folds) != 1:
            raise DataError(f"{source}: holds one run (last.pt); name its fold (got folds {folds})")
        candidates = {folds[0]: [source]}
    else:
        candidates = {k: [] for k in folds}
        for ckpt in sorted(source.rglob("last.pt")):
            name = ckpt.parent.name
            if name.startswith("fold") and name[4:].isdigit() and int(name[4:]) in candidates:
                candidates[int(name[4:])].append(ckpt.parent)
    staged: list[Path] = []
    for k in folds:
        found = candidates.get(k, [])
        dst = out_dir / f"fold{k}"
        if not found:
            logger.info(f"resume: no fold{k}/last.pt under {source}; fold {k} starts fresh")
            continue
        epochs = {d: _checkpoint_epoch(d / "last.pt") for d in found} if len(found) > 1 else {found[0]: None}
        src = max(found, key=lambda d: (epochs[d] or 0))
        if src.resolve() == dst.resolve():
            staged.append(dst)
            continue
        src_epoch = epochs[src] if epochs[src] is not None else _checkpoint_epoch(src / "last.pt")
        if (dst / "last.pt").is_file() and _checkpoint_epoch(dst / "last.pt") >= src_epoch:
            logger.info(f"resume: {dst / 'last.pt'} is at least as far as {src / 'last.pt'} (epoch {src_epoch}); kept")
        else:
            _copy_run_folder(src, dst)
            logger.info(f"resume: copied {src} (epoch {src_epoch}) to {dst}")
        staged.append(dst)
    return staged


def torchrun_command(nproc: int, config: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     fold: int = 0, *, epochs: int | None = None, resume: bool = False,
                     time_limit: float | None = None, device: str | None = None,
                     python: str | None = None, allow_config_change: bool = False,
                     time_budget: float | None = None, init_from: str | os.PathLike | None = None,
                     prepared: Any = None, memory_gb: float | None = None) -> list[str]:
    """The command that trains one fold on ``nproc`` processes: ``python -m torch.distributed.run
    --standalone --nproc_per_node N -m kaggle_utils train --config CFG --fold K --data-dir D --out RUN
    --no-progress [--epochs E] [--resume | --resume-force] [--time-limit-s S] [--time-budget S]
    [--init-from CKPT] [--prepared DIR ...] [--memory-gb G] [--device DEV]`` (``--resume-force`` with ``allow_config_change``;
    ``time_budget`` / ``init_from`` override ``train.time_budget_s`` / ``train.init_from`` as in :func:`train`).

    ``python -m torch.distributed.run`` is ``torchrun`` run by this interpreter (the notebook's).
    ``device`` ``None`` gives each rank its own GPU (``LOCAL_RANK``); ``"cpu"`` trains on CPU (gloo).
    """
    if nproc < 1:
        raise ValueError(f"nproc: must be >= 1, got {nproc}")
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "kaggle_utils", "train", "--config", str(config), "--fold", str(fold), "--data-dir", str(data_dir),
           "--out", str(out_dir), "--no-progress"]
    if epochs is not None:
        cmd += ["--epochs", str(int(epochs))]
    if allow_config_change:
        cmd.append("--resume-force")
    elif resume:
        cmd.append("--resume")
    if time_limit is not None:
        cmd += ["--time-limit-s", f"{float(time_limit):.0f}"]
    if time_budget is not None:
        cmd += ["--time-budget", f"{float(time_budget):g}"]
    if init_from is not None:
        cmd += ["--init-from", str(init_from)]
    if prepared:
        cmd += ["--prepared", *([str(prepared)] if isinstance(prepared, (str, os.PathLike)) else map(str, prepared))]
    if memory_gb is not None:
        cmd += ["--memory-gb", f"{float(memory_gb):g}"]
    if device is not None:
        cmd += ["--device", str(device)]
    return cmd


def train_torchrun(nproc: int, config: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   folds: list[int] | None = None, *, epochs: int | None = None, resume: bool = False,
                   time_limit: float | None = None, device: str | None = None,
                   env: dict[str, str] | None = None, allow_config_change: bool = False,
                   time_budget: float | None = None, init_from: str | os.PathLike | None = None,
                   prepared: Any = None, memory_gb: float | None = None) -> list[TrainResult]:
    """Train folds with DistributedDataParallel on ``nproc`` processes (both T4s: ``nproc=2``) from a notebook.

    Runs :func:`torchrun_command` once per fold, writing ``out_dir/fold{k}`` as :func:`train_folds`
    does, with the processes' output streamed line by line to this process's stdout (the notebook).
    A shared ``time_limit`` is split as in :func:`train_folds`.

    Args:
        nproc: processes (GPUs) per run.
        config: training YAML path or shipped config name (read by the subprocesses).
        data_dir: competition-layout folder.
        out_dir: parent of the ``fold{k}`` run folders.
        folds: folds to train; default every ``train.n_folds`` of the config.
        epochs: override ``train.epochs``.
        resume: continue each fold from its ``last.pt`` (see :func:`stage_resume`).
        allow_config_change: resume even when the config differs from the checkpoints' (see :func:`train`).
        time_limit: seconds for all folds together (a hard stop, ``--time-limit-s``).
        time_budget: seconds for all folds together (default ``train.time_budget_s``): each fold runs
            with ``--time-budget`` of an equal share (:func:`fold_budget`), finished inside it.
        init_from: start every fold from this checkpoint's weights (``--init-from``, ``train.init_from``).
        prepared: folder(s) of a prepared cache (``--prepared``, ``sampler.prepared``).
        memory_gb: the memory budget of all ranks together (``--memory-gb``, ``train.memory_gb``).
        device: ``None`` (one GPU per rank) or ``"cpu"`` (gloo, for tests).
        env: extra environment variables for the subprocesses.

    Returns:
        One :class:`TrainResult` per finished fold (read back with :meth:`TrainResult.load`).

    Raises:
        ConfigError: ``folds`` or ``time_budget`` is not given and ``config`` cannot be read here.
        RuntimeError: a launch exited with a non-zero status (its output is above).
    """
    if folds is None or time_budget is None:
        cfg = load_train_config(config)
        folds = list(range(cfg.train.n_folds)) if folds is None else folds
        time_budget = cfg.train.time_budget_s if time_budget is None else time_budget
    if time_budget is not None:
        print(budget_split_line(time_budget, folds), flush=True)
        time_budget = fold_budget(time_budget, len(folds))
    run_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    t0 = time.monotonic()
    results: list[TrainResult] = []
    for k in folds:
        left = None if time_limit is None else max(0.0, time_limit - (time.monotonic() - t0))
        cmd = torchrun_command(nproc, config, data_dir, Path(out_dir) / f"fold{k}", k, epochs=epochs, resume=resume,
                               time_limit=left, device=device, allow_config_change=allow_config_change,
                               time_budget=time_budget, init_from=init_from, prepared=prepared, memory_gb=memory_gb)
        print("$ " + " ".join(cmd), flush=True)
        tail: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=run_env) as proc:
            for line in proc.stdout or ():
                sys.stdout.write(line)
                sys.stdout.flush()
                tail = (tail + [line.rstrip()])[-1:] if line.strip() else tail
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"torchrun for fold {k} exited with status {rc}"
                               + (f"; last line: {tail[-1]}" if tail else "") + " (full output above)")
        results.append(TrainResult.load(Path(out_dir) / f"fold{k}"))
        if results[-1].stopped == "time_limit":
            break
    return results
