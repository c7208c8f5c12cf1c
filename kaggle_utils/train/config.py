"""The training run's configuration: one YAML file, one dataclass per section.

:class:`TrainConfig` holds the sections ``model``, ``loss``, ``sampler``, ``augment``, ``optim``
(:class:`OptimConfig`), ``train`` (:class:`LoopConfig`), ``validation`` (:class:`ValidationConfig`),
``inference`` and ``postprocess``; :func:`load_train_config` reads it from a YAML file or a
shipped config name (through :func:`kaggle_utils.config.load_config`, the one loader). Every name
here is also importable from :mod:`kaggle_utils.train` (this module was ``kaggle_utils.train_config``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from ..augment import AugmentConfig
from ..collapse import (
    COLLAPSE_MAX_FG,
    COLLAPSE_MAX_RATIO,
    COLLAPSE_MIN_RATIO,
    COLLAPSE_RECOVER_RATIO,
    COLLAPSE_STOP_AFTER,
)
from ..config import PatchShape, load_config
from ..data import IGNORE_LABEL
from ..device import normalize_amp
from ..inference import InferenceConfig
from ..losses import LossConfig
from ..models import NNUNET_ARCHITECTURES, ModelConfig, bottleneck_min_voxels, model_divisor, validate_patch_size
from ..postprocess import PostprocessConfig
from ..sampling import SamplerConfig

__all__ = [
    "LABEL_MODES",
    "OptimConfig",
    "LoopConfig",
    "ValidationConfig",
    "TrainConfig",
    "load_train_config",
]

LABEL_MODES = ("ignore", "foreground", "background")


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
            for ``plateau_patience`` validations), ``poly`` (nnU-Net's ``lr * (1 - t)^poly_exponent``,
            ``t`` the fraction of the run done, reaching 0 at the end) or ``constant``. With
            ``train.time_budget_s`` the fraction done is the budget's elapsed fraction.
        poly_exponent: exponent of the ``poly`` schedule (nnU-Net: 0.9).
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
    schedule: Literal["cosine", "plateau", "constant", "poly"] = "cosine"
    poly_exponent: float = 0.9
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
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.momentum: must be in [0, 1), got {self.momentum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.plateau_factor <= 1:
            raise ValueError(f"optim.plateau_factor: must be in (0, 1], got {self.plateau_factor}")


@dataclass
class LoopConfig:
    """The ``train:`` section.

    Attributes:
        epochs: number of epochs; an epoch is ``sampler.patches_per_epoch`` patches (per rank).
        batch_size: patches per forward pass (per rank).
        num_workers: DataLoader worker processes (0: load in the main process).
        amp: mixed precision, one of :data:`~kaggle_utils.device.AMP_MODES` (the same
            vocabulary as ``inference.amp``): ``off`` (full precision; YAML ``off``/``false``),
            ``auto`` (float16 on CUDA, full precision on CPU), ``fp16`` (float16 autocast +
            GradScaler on CUDA, T4/V100; bfloat16 on CPU) or ``bf16`` (bfloat16 autocast, A100/H100,
            CPUs). The old ``none`` still means ``off`` (with a deprecation warning).
        ema: keep an exponential moving average of the weights; validation, ``best.pt`` and the
            OOF predictions use it.
        ema_decay: EMA decay per optimizer step.
        seed: seeds model init, patch sampling and augmentation (same seed, same run).
        n_folds: number of scroll-grouped folds (``data.make_folds``); ``1`` holds no fold out:
            fold 0 trains on every volume, without validation, early stopping, ``best.pt`` or
            out-of-fold predictions (the choice for a final model, or data of a single scroll).
        label_mode: what the network learns as surface: ``ignore`` (label 1; label 2 excluded from
            the loss, the default and the right choice), ``foreground`` (``label > 0``, i.e. label 2
            counted as surface: the original bug that collapses) or ``background`` (label 2 counted
            as background).
        time_limit_s: stop cleanly (checkpoint kept) before this many seconds of this session;
            the CLI's ``--time-limit-s`` overrides it.
        time_budget_s: plan the run to end inside this many seconds (CLI ``--time-budget``): the
            learning-rate schedule follows the budget's elapsed fraction instead of epochs
            (``train.epochs`` becomes an upper bound), training stops when the time left is needed for
            the final validation, checkpoints and out-of-fold probabilities, and the run ends (stop
            reason ``time_budget``) with an annealed model. Unlike ``time_limit_s`` (a hard stop of a run
            meant to be resumed), a budgeted run is finished when it stops.
        budget_reserve: fraction of ``time_budget_s`` kept for the final validation and out-of-fold
            predictions (more when a measured validation says so).
        init_from: start from this checkpoint's weights (``best.pt``, ``last.pt`` or an exported
            ``model.pt`` of the same network; CLI ``--init-from``) with a new optimizer and schedule,
            e.g. a 128^3 model fine-tuned at 192^3. Ignored when resuming.
        augment: apply ``augment`` on the training device to whole batches (``augment_batch``).
        deterministic: cuDNN deterministic kernels (needed for bitwise resume on GPU).
        check_labels: read every training and validation label once before the first epoch
            (values in {0, 1, 2}, the image's shape; a tqdm bar), so that a bad label stops the run
            in minutes rather than when a patch of it is first drawn, hours in. Volumes of a
            prepared cache (``sampler.prepared``) were checked by ``prepare`` and are not read again.
        memory_gb: the run's memory budget in GiB (CLI ``--memory-gb``); ``null``: ``memory_fraction``
            of the memory free at start (:mod:`kaggle_utils.memory`). The decoded-volume caches of all
            ranks and workers share it; a run that cannot fit stops before training, saying what to lower.
        memory_fraction: share of the free memory (``MemAvailable``, or the cgroup's room) the budget takes.
        channels_last: train in ``torch.channels_last_3d`` memory format (model and batches); on
            tensor-core GPUs cuDNN may pick faster fp16 3D convolutions (``benchmarks/gpu.py``
            measures both). Numerically equivalent up to float rounding.
    """

    epochs: int = 50
    batch_size: int = 2
    num_workers: int = 2
    amp: str | bool = "off"
    ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    n_folds: int = 5
    label_mode: Literal["ignore", "foreground", "background"] = "ignore"
    time_limit_s: float | None = None
    time_budget_s: float | None = None
    budget_reserve: float = 0.1
    init_from: str | None = None
    augment: bool = True
    deterministic: bool = True
    check_labels: bool = True
    memory_gb: float | None = None
    memory_fraction: float = 0.8
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.amp = normalize_amp(self.amp, "train.amp")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise ValueError(f"train.memory_gb: must be > 0 GiB (or null: a share of the free memory), got {self.memory_gb}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"train.memory_fraction: must be in (0, 1], got {self.memory_fraction}")
        if self.n_folds < 1:
            raise ValueError(f"train.n_folds: must be >= 1 (1: no held-out fold, train on every volume), "
                             f"got {self.n_folds}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers: must be >= 0, got {self.num_workers}")
        if self.epochs < 1:
            raise ValueError(f"train.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"train.ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"train.time_budget_s: must be > 0 seconds, got {self.time_budget_s}")
        if not 0 <= self.budget_reserve < 1:
            raise ValueError(f"train.budget_reserve: must be in [0, 1), got {self.budget_reserve}")


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
        on_collapse: when the collapse guard fires: ``warn`` (log it) or ``stop`` (end the run once
            ``collapse_stop_after`` validations in a row were flagged, see
            :meth:`~kaggle_utils.collapse.CollapseGuard.should_stop`).
        stop_kinds: collapse kinds that ``on_collapse: stop`` acts on (``foreground``, ``uniform``,
            ``constant``, ``empty``, ``under``); ``empty`` and ``under`` are left out by default because
            young models often predict little or nothing at first.
        collapse_max_ratio: the guard flags ``foreground`` collapse when the mean predicted share of
            labelled voxels exceeds this multiple of the labelled surface share
            (:data:`~kaggle_utils.collapse.COLLAPSE_MAX_RATIO`, the rule ``diagnose`` uses).
        collapse_max_fg: ... or exceeds this absolute share (:data:`~kaggle_utils.collapse.COLLAPSE_MAX_FG`).
        collapse_min_ratio: the guard flags ``under`` (strong under-segmentation) below this multiple
            of the labelled surface share (:data:`~kaggle_utils.collapse.COLLAPSE_MIN_RATIO`, 0.5:
            the mirror of ``collapse_max_ratio``).
        collapse_recover_ratio: a run flagged for ``foreground`` stays flagged until the ratio is at
            or below this multiple (:data:`~kaggle_utils.collapse.COLLAPSE_RECOVER_RATIO`).
        collapse_stop_after: flagged validations in a row before ``on_collapse: stop`` ends the run
            (:data:`~kaggle_utils.collapse.COLLAPSE_STOP_AFTER`; healthy young runs were flagged
            for at most 2 in a row, collapsed ones for 7 or more, docs/collapse.md).
        write_oof: write out-of-fold probabilities of all validation volumes at the end of the fold.
        oof_format: their file format (:mod:`kaggle_utils.probs`): ``uint8`` (compact ``{id}.npz``,
            ``round(p * 255)``, 25-47 % of float16 on disk, default) or ``float16`` (``{id}.npy``,
            62.5 MiB per 320³ volume).
        ids: with ``--fold all`` (or ``train.n_folds`` 1), the volume ids to validate on (they are
            also trained on: an in-sample check, not a held-out score); ``null``: no validation.
    """

    every: int = 1
    n_volumes: int | None = None
    n_score: int = 2
    patch_size: PatchShape | None = None
    overlap: float = 0.25
    batch_size: int = 2
    patience: int | None = 10
    min_delta: float = 0.0
    on_collapse: Literal["warn", "stop"] = "warn"
    stop_kinds: list[str] = field(default_factory=lambda: ["foreground", "uniform", "constant"])
    collapse_max_ratio: float = COLLAPSE_MAX_RATIO
    collapse_max_fg: float = COLLAPSE_MAX_FG
    collapse_min_ratio: float = COLLAPSE_MIN_RATIO
    collapse_recover_ratio: float = COLLAPSE_RECOVER_RATIO
    collapse_stop_after: int = COLLAPSE_STOP_AFTER
    write_oof: bool = True
    oof_format: Literal["uint8", "float16"] = "uint8"
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"validation.every: must be >= 1, got {self.every}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"validation.overlap: must be in [0, 1), got {self.overlap}")
        if not 0 < self.collapse_max_fg <= 1:
            raise ValueError(f"validation.collapse_max_fg: must be a share in (0, 1], got {self.collapse_max_fg}")
        if self.collapse_stop_after < 1:
            raise ValueError(f"validation.collapse_stop_after: must be >= 1, got {self.collapse_stop_after}")
        if not 0 < self.collapse_recover_ratio <= self.collapse_max_ratio:
            raise ValueError(f"validation.collapse_recover_ratio: must be in (0, collapse_max_ratio "
                             f"{self.collapse_max_ratio:g}], got {self.collapse_recover_ratio}")
        if not 0 <= self.collapse_min_ratio < 1:
            raise ValueError(f"validation.collapse_min_ratio: must be in [0, 1), got {self.collapse_min_ratio}")
        bad = sorted(set(self.stop_kinds) - {"foreground", "uniform", "constant", "empty", "under"})
        if bad:
            raise ValueError(f"validation.stop_kinds: unknown kind(s) {bad}; use foreground, uniform, constant, "
                             f"empty, under")


@dataclass
class TrainConfig:
    """A whole training run, one YAML file with these sections (each optional, defaults below).

    Attributes:
        model: :class:`~kaggle_utils.models.ModelConfig`.
        loss: :class:`~kaggle_utils.losses.LossConfig` (preset ``default``, ``seed-v1``, ``seed-v2``).
        sampler: :class:`~kaggle_utils.sampling.SamplerConfig` (patch size, patches per epoch, ...).
        augment: :class:`~kaggle_utils.augment.AugmentConfig`.
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
        div, least = model_divisor(self.model), bottleneck_min_voxels(self.model)
        validate_patch_size(self.sampler.patch_size, div, "sampler.patch_size",
                            bottleneck_min_voxels(self.model, self.train.batch_size))  # BatchNorm trains per batch
        if self.validation.patch_size is not None:
            validate_patch_size(self.validation.patch_size, div, "validation.patch_size", least)
        validate_patch_size(self.inference.patch_size, div, "inference.patch_size", least)
        if self.loss.deep_supervision and self.model.arch not in NNUNET_ARCHITECTURES:
            raise ValueError(f"loss.deep_supervision: needs an nnU-Net network (model.arch one of "
                             f"{list(NNUNET_ARCHITECTURES)}), not {self.model.arch}")
        if self.train.label_mode == "ignore" and self.loss.ignore_label != IGNORE_LABEL:
            raise ValueError(
                f"loss.ignore_label: must be {IGNORE_LABEL} with train.label_mode 'ignore' "
                f"(got {self.loss.ignore_label!r}); use label_mode 'foreground' to count label 2 as surface"
            )


def load_train_config(path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
    """Load a :class:`TrainConfig` from YAML; errors are :class:`~kaggle_utils.config.ConfigError`
    naming the file and key.

    Args:
        path: a YAML file (an existing file, or any path with a folder), or the name of a shipped
            config without a folder: ``kaggle-t4`` or ``kaggle-t4.yaml`` is
            ``kaggle_utils/configs/kaggle-t4.yaml`` (:func:`kaggle_utils.config.shipped_configs`).
            A path that does not exist is an error naming it, never replaced by a shipped copy.
        overrides: ``{"section.key": value}`` applied on top (e.g. ``{"train.epochs": 3}``).
    """
    return load_config(TrainConfig, path, overrides=overrides)
