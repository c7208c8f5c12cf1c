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
``setup._set_up`` (data split, label pre-check, loader, model...) → ``setup._resume`` → per epoch
``loop._train_epoch`` (``loop._train_step`` per batch) → ``validation._validate_and_select``
(validate, select, collapse guard) → ``loop._checkpoint`` → ``loop._agree_on_stop`` (a
:class:`StopReason`) → ``loop._finish`` (OOF, ``result.json``).

The package's modules (each name below is importable from here):

* :mod:`~kaggle_utils.train.config`: :class:`TrainConfig` and its sections, :func:`load_train_config`;
* :mod:`~kaggle_utils.train.loop`: :func:`train` and the per-epoch steps, :func:`apply_label_mode`;
* :mod:`~kaggle_utils.train.setup`: folds, data, memory plan, model and optimizer of a run, resume, the
  run folder check;
* :mod:`~kaggle_utils.train.state`: :class:`RunState`, RNG state, time limit and budget checks;
* :mod:`~kaggle_utils.train.validation`: :func:`validate_volumes`, :func:`validation_verdict`, model
  selection, the collapse guard step, out-of-fold probabilities;
* :mod:`~kaggle_utils.train.schedule`: :class:`LRSchedule`, :data:`BUDGET_WARMUP_SHARE`, the optimizer;
* :mod:`~kaggle_utils.train.record`: :class:`TrainResult`, :class:`StopReason`, metrics files, log lines;
* :mod:`~kaggle_utils.train.dist`: the ranks of a ``torchrun`` launch;
* :mod:`~kaggle_utils.train.sessions`: :func:`train_folds`, :func:`stage_resume`, :func:`train_torchrun`.

Bad input stops the run with one line: a fold outside ``train.n_folds``
(:class:`~kaggle_utils.config.ConfigError`), an unusable device, a label outside {0, 1, 2}
(:class:`~kaggle_utils.data.DataError`; found by the ``train.check_labels`` pre-check, or by a
DataLoader worker, re-raised with the same line).
"""

from __future__ import annotations

from typing import Any

from ..device import device_name, resolve_device
from .config import LABEL_MODES, LoopConfig, OptimConfig, TrainConfig, ValidationConfig, load_train_config
from .loop import apply_label_mode, train
from .record import StopReason, TrainResult
from .schedule import BUDGET_WARMUP_SHARE, LRSchedule
from .sessions import budget_split_line, fold_budget, stage_resume, torchrun_command, train_folds, train_torchrun
from .setup import RESUME_SAFE_KEYS, assign_folds, check_fold, check_run_dir, checkpoint_bytes, config_differences, \
    split_train_val
from .state import RunState
from .validation import validate_volumes, validation_verdict

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
    "BUDGET_WARMUP_SHARE",
    "load_train_config",
    "apply_label_mode",
    "LRSchedule",
    "validate_volumes",
    "validation_verdict",
    "check_fold",
    "split_train_val",
    "assign_folds",
    "config_differences",
    "checkpoint_bytes",
    "check_run_dir",
    "resolve_device",
    "train",
    "train_folds",
    "fold_budget",
    "budget_split_line",
    "device_name",
    "stage_resume",
    "torchrun_command",
    "train_torchrun",
]

def __getattr__(name: str) -> Any:
    """``WarmupSchedule`` (removed: an ``AttributeError`` naming :class:`LRSchedule`)."""
    if name == "WarmupSchedule":
        raise AttributeError("kaggle_utils.train.WarmupSchedule was removed; use kaggle_utils.train.LRSchedule "
                             "(the same arguments)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
