"""The learning-rate schedule and the optimizer it steps.

:class:`LRSchedule` is the whole schedule (linear warmup, then cosine, poly, plateau or constant),
stepped once per optimizer step, optionally following a time budget (:data:`BUDGET_WARMUP_SHARE`);
:func:`build_optimizer` builds AdamW or SGD from ``optim``.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["BUDGET_WARMUP_SHARE", "LRSchedule", "build_optimizer"]


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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` or ``SGD`` (Nesterov when ``momentum`` > 0) over ``model``'s parameters, at ``cfg.lr``."""
    if cfg.name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
