"""The training run's configuration: one YAML file, one dataclass per section.

:class:`TrainConfig` holds the sections ``model``, ``loss``, ``sampler``, ``augment``, ``optim``
(:class:`OptimConfig`), ``train`` (:class:`LoopConfig`), ``validation`` (:class:`ValidationConfig`),
``inference`` and ``postprocess``; :func:`load_train_config` reads it from a YAML file or a
shipped config name. Every name here is also importable from :mod:`kaggle_utils.train`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .config import ConfigError, from_dict
from .data import IGNORE_LABEL
from .inference import InferenceConfig
from .losses import LossConfig
from .models import ModelConfig, model_divisor, validate_patch_size
from .postprocess import PostprocessConfig
from .sampling import AugmentConfig, SamplerConfig

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
        n_folds: number of scroll-grouped folds (``data.make_folds``); ``1`` holds no fold out:
            fold 0 trains on every volume, without validation, early stopping, ``best.pt`` or
            out-of-fold predictions (the choice for a final model, or data of a single scroll).
        label_mode: what the network learns as surface: ``ignore`` (label 1; label 2 excluded from
            the loss, the default and the right choice), ``foreground`` (``label > 0``, i.e. label 2
            counted as surface: the original bug that collapses) or ``background`` (label 2 counted
            as background).
        time_limit_s: stop cleanly (checkpoint kept) before this many seconds of this session;
            the CLI's ``--time-limit`` overrides it.
        augment: apply ``augment`` on the training device to whole batches (``augment_batch``).
        deterministic: cuDNN deterministic kernels (needed for bitwise resume on GPU).
        check_labels: read every training and validation label once before the first epoch
            (values in {0, 1, 2}, the image's shape; a tqdm bar), so that a bad label stops the run
            in minutes rather than when a patch of it is first drawn, hours in.
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
    check_labels: bool = True

    def __post_init__(self) -> None:
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

