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
  ``validation.n_score`` volumes, and the collapse guard (``diagnostics.collapse_verdict``);
* ``RUN_DIR/last.pt`` and ``RUN_DIR/best.pt`` (best competition score) written atomically every
  epoch, with everything needed to resume exactly; ``train.log``, ``metrics.jsonl``, ``metrics.csv``
  (one row per epoch) and ``val_volumes.jsonl`` (one row per validated volume and validation);
* at the end, out-of-fold probabilities of the validation volumes from ``best.pt``, predicted with
  the ``inference`` settings (window, overlap, blending, TTA) as a submission would, in
  ``RUN_DIR/oof/`` (``{id}.npy`` float16 ``(Z, Y, X)`` + ``{id}.json`` with ``id``, ``scroll_id``,
  ``fold``, ``shape``, ``epoch``), for threshold/post-processing tuning.

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
resume=True)`` continues them exactly.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from .config import ConfigError, from_dict, to_dict
from .data import (IGNORE_LABEL, DataError, atomic_path, load_index, normalize_intensity, read_label, read_volume,
                   split_fold, write_probs)
from .environment import warn_slow_conv3d_amp
from .inference import InferenceConfig
from .losses import LossConfig, build_loss
from .models import ModelConfig, build_model, model_divisor, save_checkpoint, validate_patch_size
from .postprocess import PostprocessConfig
from .sampling import AugmentConfig, PatchDataset, SamplerConfig, augment_batch, make_loader

__all__ = [
    "LABEL_MODES",
    "OptimConfig",
    "LoopConfig",
    "ValidationConfig",
    "TrainConfig",
    "TrainResult",
    "load_train_config",
    "apply_label_mode",
    "WarmupSchedule",
    "validate_volumes",
    "train",
    "train_folds",
    "device_name",
    "stage_resume",
    "torchrun_command",
    "train_torchrun",
]

logger = logging.getLogger(__name__)

LABEL_MODES = ("ignore", "foreground", "background")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """The ``optim:`` section.

    Attributes:
        name: ``AdamW`` or ``SGD`` (Nesterov momentum).
        lr: peak learning rate (reached at the end of warmup).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        momentum: SGD momentum (ignored by AdamW).
        warmup_epochs: linear warmup from ``lr / 100`` over this many epochs (fractions allowed).
        schedule: after warmup, ``cosine`` (down to ``lr * min_lr_ratio`` at the last epoch),
            ``plateau`` (multiply by ``plateau_factor`` when the validation score has not improved
            for ``plateau_patience`` validations) or ``constant``.
        min_lr_ratio: floor of the learning rate as a fraction of ``lr``.
        plateau_factor: decay factor of the ``plateau`` schedule.
        plateau_patience: validations without improvement before a ``plateau`` decay.
        grad_clip: clip the gradient norm to this value; ``null`` disables clipping.
        accumulate: optimizer step every this many batches (effective batch = batch_size x accumulate).
    """

    name: Literal["AdamW", "SGD"] = "AdamW"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    min_lr_ratio: float = 0.01
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    grad_clip: float | None = 1.0
    accumulate: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if self.accumulate < 1:
            raise ValueError(f"optim.accumulate: must be >= 1, got {self.accumulate}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        if not 0 < self.plateau_factor <= 1:
            raise ValueError(f"optim.plateau_factor: must be in (0, 1], got {self.plateau_factor}")


@dataclass
class LoopConfig:
    """The ``train:`` section.

    Attributes:
        epochs: number of epochs; an epoch is ``sampler.patches_per_epoch`` patches (per rank).
        batch_size: patches per forward pass (per rank).
        num_workers: DataLoader worker processes (0: load in the main process).
        amp: mixed precision: ``none``, ``fp16`` (float16 autocast + GradScaler, T4/V100) or
            ``bf16`` (bfloat16 autocast, A100/H100, CPUs).
        ema: keep an exponential moving average of the weights; validation, ``best.pt`` and the
            OOF predictions use it.
        ema_decay: EMA decay per optimizer step.
        seed: seeds model init, patch sampling and augmentation (same seed, same run).
        n_folds: number of scroll-grouped folds (``data.make_folds``).
        label_mode: what the network learns as surface: ``ignore`` (label 1; label 2 excluded from
            the loss, the default and the right choice), ``foreground`` (``label > 0``, i.e. label 2
            counted as surface: the original bug that collapses) or ``background`` (label 2 counted
            as background).
        time_limit_s: stop cleanly (checkpoint kept) before this many seconds of this session;
            the CLI's ``--time-limit`` overrides it.
        augment: apply ``augment`` on the training device to whole batches (``augment_batch``).
        deterministic: cuDNN deterministic kernels (needed for bitwise resume on GPU).
    """

    epochs: int = 50
    batch_size: int = 2
    num_workers: int = 2
    amp: Literal["none", "fp16", "bf16"] = "none"
    ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    n_folds: int = 5
    label_mode: Literal["ignore", "foreground", "background"] = "ignore"
    time_limit_s: float | None = None
    augment: bool = True
    deterministic: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"train.ema_decay: must be in (0, 1), got {self.ema_decay}")


@dataclass
class ValidationConfig:
    """The ``validation:`` section.

    Attributes:
        every: validate every this many epochs (and after the last one).
        n_volumes: validate on at most this many validation volumes (``null``: all of them).
        n_score: compute the local competition score on the first this many of them (it is the
            slow part: topology); 0 selects the best checkpoint by Dice instead.
        patch_size: sliding-window size; ``null`` uses ``sampler.patch_size``.
        overlap: sliding-window overlap fraction in ``[0, 1)``.
        batch_size: windows per forward pass.
        patience: early stopping after this many validations without a better score; ``null``
            disables early stopping.
        min_delta: improvement needed to count as better.
        on_collapse: when the collapse guard fires: ``warn`` (log it) or ``stop`` (end the run).
        stop_kinds: collapse kinds that ``on_collapse: stop`` acts on (``foreground``, ``uniform``,
            ``constant``, ``empty``); ``empty`` is left out by default because young models often
            predict nothing at first.
        collapse_max_ratio: the guard flags ``foreground`` collapse when the mean predicted share of
            labelled voxels exceeds this multiple of the labelled surface share.
        collapse_max_fg: ... or exceeds this absolute share.
        write_oof: write out-of-fold probabilities of all validation volumes at the end of the fold.
    """

    every: int = 1
    n_volumes: int | None = None
    n_score: int = 2
    patch_size: list[int] | None = None
    overlap: float = 0.25
    batch_size: int = 2
    patience: int | None = 10
    min_delta: float = 0.0
    on_collapse: Literal["warn", "stop"] = "warn"
    stop_kinds: list[str] = field(default_factory=lambda: ["foreground", "uniform", "constant"])
    collapse_max_ratio: float = 3.0
    collapse_max_fg: float = 0.5
    write_oof: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"validation.every: must be >= 1, got {self.every}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"validation.overlap: must be in [0, 1), got {self.overlap}")
        bad = sorted(set(self.stop_kinds) - {"foreground", "uniform", "constant", "empty"})
        if bad:
            raise ValueError(f"validation.stop_kinds: unknown kind(s) {bad}; use foreground, uniform, constant, empty")


@dataclass
class TrainConfig:
    """A whole training run, one YAML file with these sections (each optional, defaults below).

    Attributes:
        model: :class:`~kaggle_utils.models.ModelConfig`.
        loss: :class:`~kaggle_utils.losses.LossConfig` (preset ``default``, ``seed-v1``, ``seed-v2``).
        sampler: :class:`~kaggle_utils.sampling.SamplerConfig` (patch size, patches per epoch, ...).
        augment: :class:`~kaggle_utils.sampling.AugmentConfig`.
        optim: :class:`OptimConfig`.
        train: :class:`LoopConfig`.
        validation: :class:`ValidationConfig`.
        inference: :class:`~kaggle_utils.inference.InferenceConfig` stored with the checkpoint for
            prediction (validation uses its blending settings but its own window/overlap, no TTA).
        postprocess: :class:`~kaggle_utils.postprocess.PostprocessConfig` used by validation and stored.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def __post_init__(self) -> None:
        div = model_divisor(self.model)
        validate_patch_size(self.sampler.patch_size, div, "sampler.patch_size")
        if self.validation.patch_size is not None:
            validate_patch_size(self.validation.patch_size, div, "validation.patch_size")
        validate_patch_size(self.inference.patch_size, div, "inference.patch_size")
        if self.train.label_mode == "ignore" and self.loss.ignore_label != IGNORE_LABEL:
            raise ValueError(
                f"loss.ignore_label: must be {IGNORE_LABEL} with train.label_mode 'ignore' "
                f"(got {self.loss.ignore_label!r}); use label_mode 'foreground' to count label 2 as surface"
            )


def load_train_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
    """Load a :class:`TrainConfig` from YAML; errors are :class:`ConfigError` naming file and key.

    Args:
        path: YAML file; a bare name such as ``smoke-cpu`` or ``smoke-cpu.yaml`` that is not a file
            is looked up among the configs shipped in the package (``kaggle_utils/configs``).
        overrides: ``{"section.key": value}`` applied on top (e.g. ``{"train.epochs": 3}``).
    """
    from .config import load_yaml

    p = Path(path)
    if not p.is_file():
        shipped = Path(__file__).parent / "configs" / (p.name if p.suffix else p.name + ".yaml")
        if shipped.is_file():
            p = shipped
    data = load_yaml(p)
    for key, value in (overrides or {}).items():
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


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


class WarmupSchedule:
    """Learning-rate schedule stepped once per optimizer step: linear warmup, then cosine or plateau.

    ``lr(step) = base_lr * factor``; warmup rises from 1 % to 100 % over ``warmup_steps``; cosine
    then decays to ``min_lr_ratio`` at ``total_steps``; plateau multiplies by ``plateau_factor``
    each time :meth:`observe` sees ``plateau_patience`` validations without improvement.
    Has ``state_dict``/``load_state_dict`` of plain numbers for checkpoints.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.total_steps = max(1, steps_per_epoch * epochs)
        self.step_count = 0
        self.plateau_scale = 1.0
        self.plateau_best = -math.inf
        self.plateau_bad = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        """Multiplier of ``optim.lr`` at optimizer step ``step`` (default: the current one)."""
        s = self.step_count if step is None else step
        c = self.cfg
        if self.warmup_steps > 0 and s < self.warmup_steps:
            return 0.01 + 0.99 * s / self.warmup_steps
        if c.schedule == "cosine":
            t = min(1.0, (s - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if c.schedule == "plateau":
            return max(c.min_lr_ratio, self.plateau_scale)
        return 1.0

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
                "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.plateau_scale = float(state["plateau_scale"])
        self.plateau_best = float(state["plateau_best"])
        self.plateau_bad = int(state["plateau_bad"])
        self._apply()


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


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        batch_size=v.batch_size, tta="none", amp=cfg.train.amp != "none" and cfg.train.amp,
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


def validate_volumes(model: nn.Module, records: list, cfg: TrainConfig, device: torch.device,
                     progress: bool = False) -> tuple[dict, list[dict]]:
    """Validate on whole volumes: sliding window → postprocess → Dice / foreground share / score.

    Args:
        model: network (put in eval mode; the caller restores train mode).
        records: ``VolumeRecord`` s with labels.
        cfg: the run's :class:`TrainConfig` (``validation``, ``postprocess``, ``inference``).

    Returns:
        ``(summary, per_volume)``: summary keys ``val_dice`` (mean over volumes, Dice of label 1 on
        voxels with label != 2), ``val_fg_pct`` / ``val_label_fg_pct`` (mean predicted / labelled
        surface share of labelled voxels, in %), ``val_score``, ``val_topo``, ``val_sd``, ``val_voi``
        (means over the first ``n_score`` volumes, ``None`` when 0), ``collapse`` (the verdict kind),
        ``collapse_reasons``; per_volume one dict per volume with the same numbers.
    """
    from tqdm.auto import tqdm

    from .diagnostics import collapse_verdict, fg_fraction, surface_share
    from .metrics import score_volume
    from .postprocess import postprocess

    rows: list[dict] = []
    for i, rec in enumerate(tqdm(records, desc="validate", unit="vol", leave=False, disable=not progress)):
        image, label = read_volume(rec.image_path), read_label(rec.label_path)
        prob = _predict(model, image, cfg, device)
        pred = postprocess(prob, cfg.postprocess)
        valid = label != IGNORE_LABEL
        row: dict[str, Any] = {
            "id": rec.id, "scroll_id": rec.scroll_id, "dice": _dice(pred, label),
            "fg": fg_fraction(pred, label), "label_fg": surface_share(label),
            "prob_std": float(prob[valid].std()) if valid.any() else float("nan"),
        }
        if i < cfg.validation.n_score:
            s = score_volume(pred, label)
            row.update(score=float(s.score), topo=float(s.topo_score), sd=float(s.surface_dice), voi=float(s.voi_score))
        rows.append(row)
    verdict = collapse_verdict([r["fg"] for r in rows], [r["label_fg"] for r in rows],
                               prob_std=[r["prob_std"] for r in rows],
                               max_ratio=cfg.validation.collapse_max_ratio, max_fg=cfg.validation.collapse_max_fg)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        return float(np.mean(vals)) if vals else None

    summary = {
        "val_dice": mean("dice"), "val_score": mean("score"), "val_topo": mean("topo"), "val_sd": mean("sd"),
        "val_voi": mean("voi"), "val_fg_pct": 100 * (mean("fg") or 0.0),
        "val_fg_min_pct": 100 * min(r["fg"] for r in rows), "val_fg_max_pct": 100 * max(r["fg"] for r in rows),
        "val_label_fg_pct": 100 * (mean("label_fg") or 0.0), "val_prob_std": mean("prob_std"),
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
        fold: validation fold.
        epochs_completed: epochs finished (counting those of a resumed run).
        best_epoch: epoch (1-based) of ``best.pt``; ``None`` before any validation.
        best_score: its selection metric (competition score, or Dice when ``n_score`` is 0).
        stopped: ``completed``, ``early_stopping``, ``collapse``, ``time_limit`` or ``callback``.
        history: one dict per epoch (the rows of ``metrics.jsonl``).
        oof_dir: folder of the out-of-fold probabilities, or ``None``.
    """

    run_dir: Path
    fold: int
    epochs_completed: int
    best_epoch: int | None
    best_score: float | None
    stopped: str
    history: list[dict] = field(default_factory=list)
    oof_dir: Path | None = None

    def __str__(self) -> str:
        best = "-" if self.best_score is None else f"{self.best_score:.4f}"
        return (f"fold {self.fold}: {self.stopped} after {self.epochs_completed} epoch(s), best {best} at epoch "
                f"{self.best_epoch}; {self.run_dir}")

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "last.pt"

    def save(self) -> Path:
        """Write ``run_dir/result.json`` (everything but ``history``, which is ``metrics.jsonl``), atomically."""
        data = {"fold": self.fold, "epochs_completed": self.epochs_completed, "best_epoch": self.best_epoch,
                "best_score": self.best_score, "stopped": self.stopped,
                "oof_dir": None if self.oof_dir is None else str(Path(self.oof_dir).resolve())}
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
            return cls(run_dir, int(data["fold"]), int(data["epochs_completed"]), data["best_epoch"],
                       data["best_score"], str(data["stopped"]), history,
                       Path(data["oof_dir"]) if data.get("oof_dir") else None)
        except FileNotFoundError:
            raise DataError(f"{path}: missing; the run in {run_dir} did not finish (see its train.log)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: unreadable ({exc})") from None

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "best.pt"


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
    return line


def device_name(device: torch.device) -> str:
    """``cuda:0 (Tesla T4)``, ``cpu``...: the device and, for a GPU, its model."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


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
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is not None:
            self.device = torch.device(device)
            if self.device.type == "cuda" and self.device.index is None:  # "cuda": this rank's GPU
                self.device = torch.device("cuda", local if self.world > 1 else torch.cuda.current_device())
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local if self.world > 1 else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
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
               fold: int, epoch: int | None, progress: bool) -> Path:
    from tqdm.auto import tqdm

    oof = run_dir / "oof"
    oof.mkdir(parents=True, exist_ok=True)
    for rec in tqdm(records, desc="oof", unit="vol", leave=False, disable=not progress):
        prob = _predict(model, read_volume(rec.image_path), cfg, device, final=True)
        write_probs(oof, rec.id, rec.scroll_id, prob, fold,
                    checkpoint="best.pt" if epoch is not None else "last.pt", epoch=epoch)
    return oof


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fold: int = 0,
    resume: bool = False,
    time_limit: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict], bool | None] | None = None,
    verbose: bool = True,
) -> TrainResult:
    """Train one fold; the function behind ``python -m kaggle_utils train`` and the notebooks.

    Args:
        cfg: the run's :class:`TrainConfig`.
        data_dir: competition-layout folder (``train.csv``, ``train_images/``, ``train_labels/``).
        out_dir: run folder (created); checkpoints, logs and OOF predictions go here.
        fold: validation fold in ``0 .. train.n_folds-1`` (scroll-grouped, ``data.split_fold``).
        resume: continue from ``out_dir/last.pt`` exactly where it stopped (same weights, optimizer,
            scheduler, RNG and history as an uninterrupted run); starts fresh if there is none.
        time_limit: seconds this call may run (overrides ``train.time_limit_s``); the run stops
            before an epoch that would not fit, or abandons the current one, keeping ``last.pt``.
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available (per-rank GPU under torchrun).
        progress: tqdm bars within epochs and validation.
        on_epoch_end: called with each epoch's metrics row after its checkpoint is written;
            returning ``True`` stops the run (``stopped="callback"``).
        verbose: also show the log lines (device, fold start/end, epoch lines, stop reason) on
            stdout, unless the ``kaggle_utils`` logger already writes to the console (the lines
            always go to ``train.log``).

    Returns:
        :class:`TrainResult` (also written to ``out_dir/result.json``, see :meth:`TrainResult.load`).
    """
    t_start = time.monotonic()
    run_dir = Path(out_dir)
    dist_ = _Dist(device)
    dev = dist_.device
    tc, vc = cfg.train, cfg.validation
    limit = time_limit if time_limit is not None else tc.time_limit_s
    package_logger = logging.getLogger(__name__.rpartition(".")[0])  # "kaggle_utils": other modules' warnings too
    handlers: list[logging.Handler] = []
    if dist_.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(handler)
        if verbose and not _shows_on_console(logger):
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(logging.Formatter("%(message)s"))
            handlers.append(console)
        for h in handlers:
            package_logger.addHandler(h)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    log = logger.info if dist_.main else (lambda *a, **k: None)
    warn = logger.warning if dist_.main else (lambda *a, **k: None)
    try:
        log(f"fold {fold}: device {device_name(dev)}" + (f" (rank 0 of {dist_.world})" if dist_.world > 1 else ""))
        if dev.type == "cuda":
            torch.backends.cudnn.deterministic = tc.deterministic
            torch.backends.cudnn.benchmark = not tc.deterministic

        # data
        index = load_index(data_dir, "train")
        train_idx, val_idx = split_fold(index, fold, tc.n_folds)
        val_records = list(val_idx)[: vc.n_volumes] if vc.n_volumes is not None else list(val_idx)
        dataset = PatchDataset(train_idx, cfg.sampler, seed=tc.seed * 1000 + dist_.rank)
        loader = make_loader(dataset, batch_size=tc.batch_size, num_workers=tc.num_workers,
                             pin_memory=dev.type == "cuda")
        steps_per_epoch = math.ceil(len(loader) / cfg.optim.accumulate)

        # model, loss, optimizer
        _seed_everything(tc.seed)
        model = build_model(cfg.model).to(dev)
        if dist_.main:
            warn_slow_conv3d_amp(dev, tc.amp != "none")
        loss_fn = build_loss(cfg.loss).to(dev)
        optimizer = _build_optimizer(model, cfg.optim)
        schedule = WarmupSchedule(optimizer, cfg.optim, steps_per_epoch, tc.epochs)
        scaler = torch.amp.GradScaler(dev.type, enabled=tc.amp == "fp16")
        ema = None
        if tc.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)

        history: list[dict] = []
        best_score: float | None = None
        best_epoch: int | None = None
        bad_validations = 0
        start_epoch = 0
        last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
        if resume and last_path.is_file():
            ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            schedule.load_state_dict(ckpt["scheduler"])
            if ema is not None and ckpt.get("ema_state") is not None:
                ema.load_state_dict(ckpt["ema_state"])
            history = list(ckpt["history"])
            best_score, best_epoch = ckpt["best_score"], ckpt["best_epoch"]
            bad_validations = int(ckpt["bad_validations"])
            start_epoch = int(ckpt["epoch"])
            if dist_.main:
                _set_rng_state(ckpt["rng"])
            vv = run_dir / "val_volumes.jsonl"
            if dist_.main and vv.is_file():  # drop rows of epochs after the checkpoint
                keep = [ln for ln in vv.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= start_epoch]
                vv.write_text("".join(ln + "\n" for ln in keep))
            log(f"resumed {last_path} at epoch {start_epoch} (best {best_score} at epoch {best_epoch})")
        elif resume:
            warn(f"--resume: no {last_path}, starting a fresh run")
        train_model: nn.Module = model
        if dist_.world > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)

        log(f"fold {fold}: {len(train_idx)} training volume(s), {len(val_idx)} validation volume(s) "
            f"({len(val_records)} validated); {len(loader)} batch(es)/epoch x {dist_.world} rank(s) on {dev}; "
            f"label_mode {tc.label_mode}, loss {loss_fn.weights}")

        part_names: list[str] = list(loss_fn.weights) + ["total"]
        stopped = "completed"
        epoch_times: list[float] = []
        for epoch in range(start_epoch, tc.epochs):
            if limit is not None and epoch_times and time.monotonic() - t_start + max(epoch_times) > limit:
                stopped = "time_limit"
            if dist_.broadcast_flag(int(stopped == "time_limit")):
                stopped = "time_limit"
                log(f"time limit {limit:.0f}s: stopping before epoch {epoch + 1} (last.pt holds epoch {epoch})")
                break
            t_epoch = time.monotonic()
            _seed_everything(_epoch_seed(tc.seed, epoch, dist_.rank))
            aug_gen = torch.Generator(device=dev).manual_seed(_epoch_seed(tc.seed, epoch, dist_.rank) + 1)
            dataset.set_epoch(epoch)
            train_model.train()
            sums = {n: 0.0 for n in part_names}
            n_batches = 0
            optimizer.zero_grad(set_to_none=True)
            abandoned = False
            from tqdm.auto import tqdm

            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", leave=False,
                       disable=not (progress and dist_.main))
            for i, (image, label, _meta) in enumerate(bar):
                if limit is not None:
                    over = time.monotonic() - t_start > limit
                    if dist_.broadcast_flag(int(over)):  # every rank stops at the same batch
                        abandoned = True
                        break
                image = image.to(dev, non_blocking=True)
                label = label.to(dev, non_blocking=True)
                if tc.augment:
                    image, label = augment_batch(image, label, cfg.augment, aug_gen, cfg.sampler.ignore_label)
                target = apply_label_mode(label, tc.label_mode)
                last_micro = (i + 1) % cfg.optim.accumulate == 0 or i + 1 == len(loader)
                sync = contextlib.nullcontext() if (last_micro or dist_.world == 1) else train_model.no_sync()
                with sync:
                    with _autocast(dev, tc.amp):
                        logits = train_model(image)
                    total, parts = loss_fn(logits.float(), target)
                    scaler.scale(total / cfg.optim.accumulate).backward()
                if last_micro:
                    if cfg.optim.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    schedule.step()
                    if ema is not None:
                        ema.update_parameters(model)
                for n in part_names:
                    sums[n] += float(parts[n])
                n_batches += 1
                bar.set_postfix(loss=f"{sums['total'] / n_batches:.4f}")
            bar.close()
            if abandoned:
                stopped = "time_limit"
                log(f"time limit {limit:.0f}s reached inside epoch {epoch + 1}: abandoned it; "
                    f"last.pt holds epoch {epoch}")
                break

            means = dist_.mean({n: sums[n] / max(n_batches, 1) for n in part_names})
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": schedule.lr, "train_loss": means["total"]}
            row.update({f"train_{n}": means[n] for n in part_names if n != "total"})

            # validation (rank 0)
            validate_now = (epoch + 1) % vc.every == 0 or epoch + 1 == tc.epochs
            improved, stop_reason = False, ""
            if validate_now and dist_.main and val_records:
                eval_model = ema.module if ema is not None else model
                summary, per_volume = validate_volumes(eval_model, val_records, cfg, dev, progress=progress)
                model.train()
                row.update(summary)
                with open(run_dir / "val_volumes.jsonl", "a") as fh:
                    fh.writelines(json.dumps({"epoch": epoch + 1, **v}) + "\n" for v in per_volume)
                metric = summary["val_score"] if vc.n_score > 0 and summary["val_score"] is not None else summary["val_dice"]
                row["val_metric"] = metric
                if metric is not None and (best_score is None or metric > best_score + vc.min_delta):
                    best_score, best_epoch, improved, bad_validations = metric, epoch + 1, True, 0
                else:
                    bad_validations += 1
                if cfg.optim.schedule == "plateau" and metric is not None:
                    schedule.observe(metric)
                if summary["collapse"] != "healthy":
                    warn(f"collapse guard: epoch {epoch + 1}: {summary['collapse']}: {summary['collapse_reasons']} "
                         f"(predicted fg {summary['val_fg_pct']:.2f}% vs labelled {summary['val_label_fg_pct']:.2f}%)")
                    if vc.on_collapse == "stop" and summary["collapse"] in vc.stop_kinds:
                        stop_reason = "collapse"
                if not stop_reason and vc.patience is not None and bad_validations >= vc.patience:
                    stop_reason = "early_stopping"
            if dist_.world > 1 and cfg.optim.schedule == "plateau":  # rank 0 observed the score
                schedule.plateau_scale = dist_.broadcast(schedule.plateau_scale)
                schedule._apply()
            row["time_s"] = time.monotonic() - t_epoch
            history.append(row)

            if dist_.main:
                state = dict(
                    model=model.state_dict(), ema=ema.module.state_dict() if ema is not None else None,
                    ema_state=ema.state_dict() if ema is not None else None,
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), scheduler=schedule.state_dict(),
                    rng=_rng_state(), epoch=epoch + 1, fold=fold, config=to_dict(cfg), model_config=to_dict(cfg.model),
                    metrics=row, history=history, best_score=best_score, best_epoch=best_epoch,
                    bad_validations=bad_validations,
                )
                save_checkpoint(last_path, **state)
                if improved:
                    save_checkpoint(best_path, **state)
                _write_metrics(run_dir, history)
                log(_epoch_line(row, tc.epochs, part_names))
            epoch_times.append(time.monotonic() - t_epoch)
            if on_epoch_end is not None and on_epoch_end(dict(row)) and not stop_reason:
                stop_reason = "callback"
            code = {"": 0, "collapse": 1, "early_stopping": 2, "callback": 3}[stop_reason]
            code = dist_.broadcast_flag(code)
            if code:
                stopped = ["", "collapse", "early_stopping", "callback"][code]
                if stopped == "collapse":
                    log(f"stopping: the collapse guard fired at epoch {epoch + 1} and validation.on_collapse is 'stop'")
                elif stopped == "early_stopping":
                    log(f"early stopping: no better validation score for {vc.patience} validation(s); "
                        f"best {best_score:.4f} at epoch {best_epoch}")
                break

        # out-of-fold predictions from the best weights
        oof_dir = None
        if dist_.main and vc.write_oof and stopped != "time_limit" and val_idx.records:
            eval_model = model if ema is None else ema.module
            if best_path.is_file():
                from .models import load_checkpoint

                eval_model, _, _ = load_checkpoint(best_path, map_location=dev)
            oof_dir = _write_oof(eval_model, list(val_idx), cfg, dev, run_dir, fold, best_epoch, progress)
            log(f"wrote out-of-fold probabilities of {len(val_idx)} volume(s) to {oof_dir}")
        dist_.barrier()
        epochs_done = history[-1]["epoch"] if history else start_epoch
        log(f"fold {fold} finished ({stopped}) after {epochs_done} epoch(s); best {best_score} at epoch {best_epoch}")
        result = TrainResult(run_dir, fold, epochs_done, best_epoch, best_score, stopped, history, oof_dir)
        if dist_.main:
            result.save()
        return result
    finally:
        for h in handlers:
            package_logger.removeHandler(h)
            h.close()
        dist_.close()


def train_folds(cfg: TrainConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                folds: list[int] | None = None, **kwargs: Any) -> list[TrainResult]:
    """Train several folds in turn (default: all ``train.n_folds``), each in ``out_dir/fold{k}``.

    A shared ``time_limit`` is split between what is left: each fold gets the remaining time.
    """
    folds = list(range(cfg.train.n_folds)) if folds is None else folds
    limit = kwargs.pop("time_limit", None)
    t0 = time.monotonic()
    results = []
    for k in folds:
        left = None if limit is None else max(0.0, limit - (time.monotonic() - t0))
        results.append(train(cfg, data_dir, Path(out_dir) / f"fold{k}", fold=k, time_limit=left, **kwargs))
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
        raise DataError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: {exc})") from None


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
                     python: str | None = None) -> list[str]:
    """The command that trains one fold on ``nproc`` processes: ``python -m torch.distributed.run
    --standalone --nproc_per_node N -m kaggle_utils train --config CFG --fold K --data-dir D --out RUN
    --no-progress [--epochs E] [--resume] [--time-limit S] [--device DEV]``.

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
    if resume:
        cmd.append("--resume")
    if time_limit is not None:
        cmd += ["--time-limit", f"{float(time_limit):.0f}"]
    if device is not None:
        cmd += ["--device", str(device)]
    return cmd


def train_torchrun(nproc: int, config: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   folds: list[int] | None = None, *, epochs: int | None = None, resume: bool = False,
                   time_limit: float | None = None, device: str | None = None,
                   env: dict[str, str] | None = None) -> list[TrainResult]:
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
        time_limit: seconds for all folds together.
        device: ``None`` (one GPU per rank) or ``"cpu"`` (gloo, for tests).
        env: extra environment variables for the subprocesses.

    Returns:
        One :class:`TrainResult` per finished fold (read back with :meth:`TrainResult.load`).

    Raises:
        RuntimeError: a launch exited with a non-zero status (its output is above).
    """
    if folds is None:
        folds = list(range(load_train_config(config).train.n_folds))
    run_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    t0 = time.monotonic()
    results: list[TrainResult] = []
    for k in folds:
        left = None if time_limit is None else max(0.0, time_limit - (time.monotonic() - t0))
        cmd = torchrun_command(nproc, config, data_dir, Path(out_dir) / f"fold{k}", k, epochs=epochs, resume=resume,
                               time_limit=left, device=device)
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
