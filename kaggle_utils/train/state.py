"""The state one fold's training carries from epoch to epoch (:class:`RunState`), the RNG state saved
with it, and the time limit and budget checks every rank answers alike."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..collapse import CollapseGuard
from ..config import to_dict
from ..sampling import PatchDataset
from .config import TrainConfig
from .dist import _Dist
from .record import StopReason, logger
from .schedule import LRSchedule

__all__ = ["RunState"]


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch on one rank (``SeedSequence`` of ``train.seed``, epoch and rank)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, rank, 0x7EA1]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """The global RNG states (torch, numpy, Python, CUDA) as tensors and plain values ``torch.save`` with
    ``weights_only`` loads back."""
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
    """Restore the global RNG states of :func:`_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class RunState:
    """Everything one fold's training carries from epoch to epoch; the steps of
    :func:`~kaggle_utils.train.loop.train` (``setup._set_up``, ``setup._resume``, ``loop._train_epoch``,
    ``validation._validate_and_select``, ``loop._checkpoint``, ``loop._finish``) read and update it.

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


# ----------------------------------------------------------------------------------------------
# Time limit and time budget (the same answer on every rank)
# ----------------------------------------------------------------------------------------------


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
    from ..inference import tta_transforms

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
