"""Plan a training run before it starts: the cost of a configured network on paper, and a measured dry run.

Two questions a user has before an 8-hour Kaggle session, answered here:

* **On paper** (no GPU needed): :func:`step_cost` counts the floating-point operations of one training
  step (forward + backward, ``torch.utils.flop_counter.FlopCounterMode``) and the bytes of the tensors
  autograd saves for the backward pass (the activation memory), on the ``meta`` device, so a 192^3
  nnU-Net costs nothing to measure. :func:`window_count` gives the sliding-window passes of a volume and
  :func:`project_seconds` turns FLOPs into seconds on a GPU of a given peak at a given efficiency
  (:data:`T4`; BENCHMARKS.md, "T4 plan", justifies the efficiency).
* **Measured** (``python -m kaggle_utils train --dry-run``): :func:`dry_run` builds the configured
  network, loader, loss, optimizer and scaler exactly as :func:`kaggle_utils.train.train` does, runs a few
  real training steps (``train.loop._train_step``) at the configured patch, batch and precision on the chosen
  device, and reports seconds per step, the time spent waiting for the data loader, the peak memory
  (``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU) and, from those, the
  epochs and patches that fit the time budget (:func:`fit_budget`). Under ``torchrun`` it steps every
  rank through DistributedDataParallel; rank 0 reports.

Nothing here writes checkpoints; :func:`dry_run` writes nothing at all.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = [
    "GPUSpec",
    "T4",
    "StepCost",
    "step_cost",
    "forward_cost",
    "window_count",
    "project_seconds",
    "BudgetFit",
    "fit_budget",
    "DryRunReport",
    "dry_run",
    "peak_memory",
]


@dataclass(frozen=True)
class GPUSpec:
    """Published figures of a GPU.

    Attributes:
        name: the GPU.
        fp16_tflops: dense float16 tensor-core peak with float32 accumulation (what AMP uses), TFLOP/s.
        memory_gib: device memory.
        bandwidth_gbs: memory bandwidth, GB/s.
    """

    name: str
    fp16_tflops: float
    memory_gib: float
    bandwidth_gbs: float


#: NVIDIA Tesla T4 (Kaggle's "GPU T4 x2" gives two): 65 TFLOP/s fp16 tensor-core peak, 16 GB, 320 GB/s.
T4 = GPUSpec("Tesla T4", 65.0, 16.0, 320.0)


# ----------------------------------------------------------------------------------------------
# On paper: FLOPs and activation memory on the meta device
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepCost:
    """The cost of one batch through a network.

    Attributes:
        params: trainable parameters.
        forward_flops: FLOPs of one forward pass of the batch.
        step_flops: FLOPs of forward + backward (the training step; ``None`` for a forward-only count).
        saved_bytes: bytes of the tensors autograd keeps for the backward pass (one count per storage),
            in the dtype the count ran in: the activation memory of a training step, without weights,
            gradients, optimizer state and cuDNN workspaces.
    """

    params: int
    forward_flops: float
    step_flops: float | None
    saved_bytes: int


def _meta_model(model_cfg: Any, deep_supervision: bool, dtype: torch.dtype) -> torch.nn.Module:
    from .models import build_model, set_deep_supervision

    with torch.device("meta"):
        model = build_model(model_cfg)
    model = model.to(device="meta", dtype=dtype)  # parameters some builders made on the CPU anyway
    set_deep_supervision(model, deep_supervision)
    return model


def step_cost(model_cfg: Any, patch_size: Sequence[int], batch_size: int, deep_supervision: bool = False,
              dtype: torch.dtype = torch.float32, backward: bool = True) -> StepCost:
    """FLOPs and saved-tensor bytes of one training step of ``model_cfg`` on a ``(batch, 1, *patch)`` batch.

    Runs on the ``meta`` device (shapes only: no memory, seconds even for 192^3), in train mode, with
    deep supervision as configured (its extra heads count). ``dtype`` float16 gives the activation
    bytes of a half-precision run (AMP keeps some tensors in float32: the truth lies between the
    float16 and float32 counts).

    Args:
        model_cfg: a :class:`~kaggle_utils.models.ModelConfig`.
        patch_size: ``(z, y, x)``.
        batch_size: patches per step.
        deep_supervision: nnU-Net networks: every decoder stage's output (as ``loss.deep_supervision``).
        dtype: parameter and input dtype of the count.
        backward: also count the backward pass (else ``step_flops`` is ``None``).

    Returns:
        :class:`StepCost`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(model_cfg, deep_supervision, dtype).train()
    x = torch.empty((int(batch_size), 1, *(int(p) for p in patch_size)), device="meta", dtype=dtype)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s._cdata] = s.nbytes()
        return t

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        forward = float(counter.get_total_flops())
        if backward:
            outs = out if isinstance(out, (list, tuple)) else [out]
            sum(o.float().sum() for o in outs).backward()
    return StepCost(params=sum(p.numel() for p in model.parameters()), forward_flops=forward,
                    step_flops=float(counter.get_total_flops()) if backward else None,
                    saved_bytes=int(sum(storages.values())))


def forward_cost(model_cfg: Any, patch_size: Sequence[int], batch_size: int = 1) -> float:
    """FLOPs of one inference forward pass (``eval`` mode, one output) of a ``(batch, 1, *patch)`` batch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(model_cfg, False, torch.float32).eval()
    x = torch.empty((int(batch_size), 1, *(int(p) for p in patch_size)), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def window_count(shape: Sequence[int], patch_size: int | Sequence[int], overlap: float, pad_multiple: int = 32) -> int:
    """Sliding windows :func:`kaggle_utils.inference.sliding_window_predict` runs over a volume of ``shape``
    (``"even"`` placement, the default), per TTA pass and model."""
    from .config import as_patch_shape
    from .inference import pad_widths, plan_windows

    shape = tuple(int(s) for s in shape)
    roi = as_patch_shape(patch_size)
    pads = pad_widths(shape, roi, "even", pad_multiple)
    padded = [s + a + b for s, (a, b) in zip(shape, pads)]
    return len(plan_windows(padded, roi, overlap, "even"))


def project_seconds(flops: float, gpu: GPUSpec, efficiency: float) -> float:
    """Seconds for ``flops`` on ``gpu`` at ``efficiency`` (achieved share of its fp16 peak, in (0, 1])."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency: must be in (0, 1], got {efficiency}")
    return flops / (gpu.fp16_tflops * 1e12 * efficiency)


# ----------------------------------------------------------------------------------------------
# What fits a time budget
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetFit:
    """Epochs and patches of training that fit a time budget at a measured step time.

    Attributes:
        budget_s: the budget (``train.time_budget_s``, else ``train.time_limit_s``), or ``None``.
        train_s: its part for training steps (``budget_s * (1 - train.budget_reserve)`` for a time
            budget, the whole limit for a time limit); validation is not included.
        epoch_s: seconds of one epoch's steps (``steps_per_epoch * step_s``).
        epochs: whole epochs that fit ``train_s`` (``None`` without a budget; not capped by ``train.epochs``).
        patches: training patches they draw, all ranks together.
        config_epochs: ``train.epochs``; ``config_epochs_s``: seconds of their steps.
    """

    budget_s: float | None
    train_s: float | None
    epoch_s: float
    epochs: int | None
    patches: int | None
    config_epochs: int
    config_epochs_s: float


def fit_budget(step_s: float, steps_per_epoch: int, patches_per_epoch: int, world: int, epochs: int,
               time_budget_s: float | None, time_limit_s: float | None, budget_reserve: float) -> BudgetFit:
    """What fits: ``epochs`` = floor(training seconds / (steps_per_epoch x step_s)), ``patches`` =
    epochs x ``patches_per_epoch`` x ``world`` (every rank draws its own patches).

    Args:
        step_s: seconds per training step (one batch, data wait included).
        steps_per_epoch: batches per epoch and rank (``len(loader)``).
        patches_per_epoch: ``sampler.patches_per_epoch`` (per rank).
        world: ranks (GPUs).
        epochs: ``train.epochs``.
        time_budget_s, time_limit_s, budget_reserve: the ``train`` keys; the budget wins over the limit.
    """
    epoch_s = steps_per_epoch * step_s
    budget = time_budget_s if time_budget_s is not None else time_limit_s
    if budget is None:
        return BudgetFit(None, None, epoch_s, None, None, epochs, epochs * epoch_s)
    train_s = budget * (1 - budget_reserve) if time_budget_s is not None else budget
    n = int(train_s // epoch_s) if epoch_s > 0 else epochs
    return BudgetFit(float(budget), float(train_s), epoch_s, n, n * patches_per_epoch * world, epochs, epochs * epoch_s)


# ----------------------------------------------------------------------------------------------
# Measured: a dry run of the real training step
# ----------------------------------------------------------------------------------------------


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, what)``: ``torch.cuda.max_memory_allocated`` on a GPU, else this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


@dataclass
class DryRunReport:
    """What :func:`dry_run` measured (``to_json`` for files, ``lines`` for people).

    Attributes:
        config: the config's name or path. device, device_name: where it ran. world: ranks.
        arch, params: the network. patch_size, batch_size, accumulate: per step and rank.
        amp: ``train.amp``; ``amp_dtype``: the autocast dtype it resolved to (``None``: full precision).
        channels_last: ``train.channels_last``.
        warmup, steps: steps run before timing, steps timed.
        step_s: median seconds of a timed step (data wait included); ``step_times``: each of them.
        wait_s: mean seconds per timed step spent waiting for the loader; ``wait_share`` = wait / step.
        peak_memory_bytes, memory_kind: see :func:`peak_memory` (GPU: since the model was built).
        step_flops: FLOPs of one step (:func:`step_cost`) and ``achieved_tflops`` = step_flops / step_s.
        fit: :class:`BudgetFit` at ``step_s``. loss: the last step's loss (finite: it trained).
    """

    config: str
    device: str
    device_name: str
    world: int
    arch: str
    params: int
    patch_size: tuple[int, ...]
    batch_size: int
    accumulate: int
    amp: str
    amp_dtype: str | None
    channels_last: bool
    warmup: int
    steps: int
    step_s: float
    step_times: list[float]
    wait_s: float
    wait_share: float
    peak_memory_bytes: int
    memory_kind: str
    step_flops: float | None
    achieved_tflops: float | None
    fit: BudgetFit
    loss: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out

    def lines(self) -> list[str]:
        """The report as the CLI and the notebook print it."""
        gib = self.peak_memory_bytes / 2**30
        flops = f", {self.achieved_tflops:.3g} TFLOP/s achieved" if self.achieved_tflops else ""
        fit = self.fit
        out = [
            f"dry run of {self.config} on {self.device_name} ({self.world} rank(s)): {self.arch}, "
            f"{self.params / 1e6:.1f} M parameters, patch {'x'.join(map(str, self.patch_size))}, batch "
            f"{self.batch_size}, amp {self.amp} ({self.amp_dtype or 'float32'}), channels_last {self.channels_last}",
            f"  {self.steps} timed step(s) after {self.warmup} warm-up: {self.step_s:.3f} s/step (median){flops}; "
            f"data-loader wait {self.wait_s:.3f} s/step ({100 * self.wait_share:.0f} % of the step)",
            f"  peak memory {gib:.2f} GiB ({self.memory_kind})",
            f"  one epoch ({fit.epoch_s / max(self.step_s, 1e-12):.0f} steps/rank) ~ {_hms(fit.epoch_s)}; "
            f"train.epochs would take ~ {_hms(fit.config_epochs_s)} of steps (validation not included)",
        ]
        if fit.budget_s is not None:
            cap = f" (train.epochs caps the run at {fit.config_epochs})" if (fit.epochs or 0) > fit.config_epochs else ""
            out.append(f"  time budget {_hms(fit.budget_s)} ({_hms(fit.train_s or 0)} for steps): fits "
                       f"{fit.epochs} epoch(s) = {fit.patches} patches{cap}")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _hms(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.1f} s"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(state: Any, n: int) -> tuple[list[float], list[float], float]:
    """Run ``n`` training steps of ``state`` (``train.RunState``): ``(step seconds, wait seconds, last loss)``."""
    from .train.loop import _train_step

    dev = state.device
    gen = torch.Generator(device=dev).manual_seed(state.cfg.train.seed + 1)
    steps: list[float] = []
    waits: list[float] = []
    loss = float("nan")
    i = 0
    while i < n:
        state.dataset.set_epoch(i)
        it = iter(state.loader)
        for _ in range(len(state.loader)):
            if i >= n:
                break
            t0 = time.perf_counter()
            image, label, _meta = next(it)
            t1 = time.perf_counter()
            parts = _train_step(state, i % len(state.loader), image, label, gen)
            loss = float(parts["total"])  # a host sync: the step is done
            _sync(dev)
            steps.append(time.perf_counter() - t0)
            waits.append(t1 - t0)
            i += 1
        del it
    return steps, waits, loss


def dry_run(cfg: Any, data_dir: Any, fold: int | str = 0, device: str | torch.device | None = None,
            steps: int = 5, warmup: int = 2, config_name: str = "config", count_flops: bool = True,
            time_budget: float | None = None, time_limit: float | None = None) -> DryRunReport:
    """A few real training steps of ``cfg`` on ``device``, timed (see the module doc).

    The run is set up as :func:`kaggle_utils.train.train` sets it up (``train.setup._set_up``: data split,
    loader with ``train.num_workers``, model, loss, optimizer, GradScaler, EMA, DDP under torchrun) but
    without the label pre-check, and nothing is written.

    Args:
        cfg: the :class:`~kaggle_utils.train.config.TrainConfig`.
        data_dir: competition-layout folder with ``train.csv``.
        fold: the fold whose training volumes the patches come from.
        device: ``cuda``, ``cpu``, ...; default CUDA when available (per-rank GPU under torchrun).
        steps: timed steps (>= 1); ``warmup``: untimed steps before them (cuDNN autotuning, worker start).
        config_name: how the report names the config.
        count_flops: also count the step's FLOPs on the meta device (:func:`step_cost`).
        time_budget: seconds to plan for (overrides ``train.time_budget_s``).
        time_limit: a hard limit to plan for when there is no budget (overrides ``train.time_limit_s``).

    Returns:
        :class:`DryRunReport` (on every rank; rank 0's is the one to print).
    """
    from .device import device_name, resolve_amp_dtype
    from .train.dist import _Dist
    from .train.setup import _set_up, _wrap_ddp, check_fold

    if steps < 1 or warmup < 0:
        raise ValueError(f"dry run: steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    check_fold(fold, cfg.train.n_folds)
    changes: dict[str, Any] = {"check_labels": False}
    if time_budget is not None:
        changes["time_budget_s"] = float(time_budget)
    if time_limit is not None:
        changes["time_limit_s"] = float(time_limit)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
    dist = _Dist(device)
    try:
        dev = dist.device
        state = _set_up(cfg, data_dir, None, fold, dist, None, time.monotonic(), False)  # type: ignore[arg-type]
        _wrap_ddp(state)
        _timed_steps(state, warmup)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times, waits, loss = _timed_steps(state, steps)
        return _report(cfg, state, dist, dev, device_name(dev), config_name, warmup, times, waits, loss,
                       count_flops, resolve_amp_dtype(cfg.train.amp, dev))
    finally:
        dist.close()


def _report(cfg: Any, state: Any, dist: Any, dev: torch.device, dev_name: str, config_name: str, warmup: int,
            times: list[float], waits: list[float], loss: float, count_flops: bool,
            amp_dtype: torch.dtype | None) -> DryRunReport:
    """The :class:`DryRunReport` of measured steps (``times``/``waits`` in seconds)."""
    from .models import describe_model

    tc = cfg.train
    step_s = float(statistics.median(times))
    wait_s = float(sum(waits) / len(waits))
    mem, kind = peak_memory(dev)
    flops = None
    if count_flops:
        flops = step_cost(cfg.model, cfg.sampler.patch_size, tc.batch_size, cfg.loss.deep_supervision).step_flops
    fit = fit_budget(step_s, len(state.loader), cfg.sampler.patches_per_epoch, dist.world, tc.epochs,
                     tc.time_budget_s, tc.time_limit_s, tc.budget_reserve)
    notes = []
    if not math.isfinite(loss):
        notes.append(f"the last step's loss is {loss}: check train.amp and optim.lr before a long run")
    if wait_s / step_s > 0.25:
        notes.append(f"the GPU waits for data {100 * wait_s / step_s:.0f} % of the time: raise train.num_workers "
                     f"(now {tc.num_workers}) or sampler.cache_bytes")
    return DryRunReport(
        config=config_name, device=str(dev), device_name=dev_name, world=dist.world,
        arch=describe_model(cfg.model), params=sum(p.numel() for p in state.model.parameters()),
        patch_size=tuple(cfg.sampler.patch_size), batch_size=tc.batch_size, accumulate=cfg.optim.accumulate,
        amp=str(tc.amp), amp_dtype=None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
        channels_last=bool(tc.channels_last), warmup=warmup, steps=len(times), step_s=step_s,
        step_times=[float(t) for t in times], wait_s=wait_s, wait_share=wait_s / step_s if step_s > 0 else 0.0,
        peak_memory_bytes=mem, memory_kind=kind, step_flops=flops,
        achieved_tflops=None if flops is None else flops / step_s / 1e12, fit=fit, loss=loss, notes=notes)
