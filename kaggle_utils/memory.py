"""One memory budget for a whole run: every rank, every DataLoader worker, validation and prediction.

The budget is a share (``train.memory_fraction``, default 0.8) of the memory free when the run
starts: ``MemAvailable`` of ``/proc/meminfo``, or less when a cgroup (a container such as Kaggle's)
limits the process tree (limit minus its usage without reclaimable file pages). ``train.memory_gb``
(CLI ``--memory-gb``) replaces it. :func:`plan_train_memory` adds up what a run holds besides the
ranks' own interpreters (already in use when the budget is read):

- ``caches``: the decoded-volume LRU of every worker of every rank (``sampler.cache_bytes`` each;
  ``null`` splits what is left of the budget evenly, at most the whole training set per worker);
  0 with a prepared cache (``sampler.prepared``: memory-mapped, the shared page cache holds it);
- ``workers``: each DataLoader worker's own pages (:data:`WORKER_BYTES`);
- ``batches``: batches in flight (``prefetch_factor`` per worker, and their pinned copies);
- ``validation``: rank 0 validating its largest volume (:data:`VALIDATION_BYTES_PER_VOXEL`);
- ``model``: host copies of the weights, optimizer state and EMA (the whole training on CPU, the
  checkpoint's copy on GPU).

A configuration whose fixed costs plus one volume per worker exceed the budget stops before
training with one line (:class:`MemoryBudgetError`) naming what to lower. ``predict`` does the same
for its ensemble and prefetched volumes (:func:`plan_predict_memory`).

The per-item constants were measured on CPU here (``benchmarks/memory.py``; BENCHMARKS.md, "Prepared
cache and memory budget"), not on a GPU box; the functions are pure and take them as arguments, so the
arithmetic is tested without a machine.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError

__all__ = [
    "GiB",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_FRACTION",
    "WORKER_BYTES",
    "VALIDATION_BYTES_PER_VOXEL",
    "PREDICT_BYTES_PER_VOXEL",
    "MemoryBudgetError",
    "MachineMemory",
    "parse_meminfo",
    "read_machine_memory",
    "budget_bytes",
    "TrainMemoryInputs",
    "MemoryPlan",
    "plan_train_memory",
    "PredictMemoryInputs",
    "plan_predict_memory",
    "fmt_bytes",
    "volume_shapes",
    "train_memory_inputs",
]

GiB = 1024**3
#: ``sampler.cache_bytes`` of a :class:`~kaggle_utils.sampling.PatchDataset` built outside ``train`` with ``null``.
DEFAULT_CACHE_BYTES = 2 * GiB
#: share of the free memory a run may plan with (``train.memory_fraction``).
DEFAULT_FRACTION = 0.8
#: a forked DataLoader worker's own resident pages besides its volume cache (torch imported, copy-on-write
#: pages it touched, a batch being built): measured 102 MiB on CPU (benchmarks/memory.py), taken x2.5.
WORKER_BYTES = 256 * 1024**2
#: rank 0's peak while validating one volume, per voxel: uint8 image and label, float32 normalized and
#: padded input, float32 probabilities, post-processing masks and labels, the metric's distance maps:
#: measured 37.0 on CPU for a 320^3 volume (the sliding-window sums on the host too), taken as 40.
VALIDATION_BYTES_PER_VOXEL = 40
#: ``predict``'s peak per voxel of the volume being predicted (uint8 read, float32 input, probabilities,
#: post-processing) without the sliding-window sums: measured 33.4 on CPU with them (2 x float32), so 26;
#: on CPU the 8 bytes of the sums come on top.
PREDICT_BYTES_PER_VOXEL = 26


class MemoryBudgetError(ConfigError):
    """The run cannot fit the memory budget; the one-line message says what to lower."""


def fmt_bytes(n: float) -> str:
    """``18.0 GiB`` / ``512 MiB``."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 1024**2:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# What the machine has
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineMemory:
    """Memory the run may use, in bytes.

    Attributes:
        total: ``MemTotal``.
        available: ``MemAvailable`` (free plus reclaimable).
        cgroup_limit: the cgroup's limit (``memory.max`` / ``memory.limit_in_bytes``), ``None`` when unlimited.
        cgroup_used: the cgroup's usage without inactive file pages, ``None`` without a limit.
    """

    total: int
    available: int
    cgroup_limit: int | None = None
    cgroup_used: int | None = None

    @property
    def free(self) -> int:
        """What a new allocation can get: ``available``, or less under a cgroup limit."""
        if self.cgroup_limit is None:
            return self.available
        return max(0, min(self.available, self.cgroup_limit - (self.cgroup_used or 0)))

    def describe(self) -> str:
        """``MemAvailable 22.9 of 23.5 GiB`` (+ the cgroup's limit)."""
        text = f"MemAvailable {fmt_bytes(self.available)} of {fmt_bytes(self.total)}"
        if self.cgroup_limit is not None:
            text += f", cgroup {fmt_bytes(self.cgroup_used or 0)} used of {fmt_bytes(self.cgroup_limit)}"
        return text


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as ``{key: bytes}`` (``kB`` values multiplied by 1024)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    """The value of ``key`` in a cgroup ``memory.stat`` file (``key value`` lines); 0 when absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup(root: Path, total: int) -> tuple[int | None, int | None]:
    """``(limit, usage without inactive file pages)`` of cgroup v2 or v1; ``(None, None)`` when unlimited."""
    for limit_f, usage_f, stat_f, inactive_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        limit = _read_int(root / limit_f)
        if limit is None:
            continue
        if limit >= total:  # "max", or a huge number: no limit below the machine's memory
            return None, None
        usage = _read_int(root / usage_f) or 0
        return limit, max(0, usage - _stat_value(root / stat_f, inactive_key))
    return None, None


def read_machine_memory(proc: str | os.PathLike = "/proc/meminfo",
                        cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> MachineMemory:
    """This machine's :class:`MachineMemory` (``/proc/meminfo`` and the cgroup, v2 or v1)."""
    info = parse_meminfo(Path(proc).read_text())
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    limit, used = _cgroup(Path(cgroup_root), total)
    return MachineMemory(total, available, limit, used)


def budget_bytes(machine: MachineMemory, fraction: float = DEFAULT_FRACTION,
                 override_gb: float | None = None) -> tuple[int, str]:
    """``(budget in bytes, how it was set)``: ``override_gb`` GiB when given, else ``fraction`` of ``machine.free``."""
    if override_gb is not None:
        return int(override_gb * GiB), f"set to {override_gb:g} GiB"
    return int(fraction * machine.free), f"{fraction:.0%} of free memory ({machine.describe()})"


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainMemoryInputs:
    """What a training run holds, in bytes unless said otherwise.

    Attributes:
        ranks, workers: processes (``torchrun`` ranks) and DataLoader workers per rank (0: the rank loads).
        volume_bytes: decoded image + label of the largest training volume (an LRU keeps at least one).
        dataset_bytes: decoded image + label of all training volumes (more cache than that is useless).
        batch_bytes: one batch (float32 image + uint8 label patches).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: batches are also copied to pinned memory (CUDA).
        val_voxels: voxels of the largest volume rank 0 validates (0: none).
        model_bytes: float32 weights of the network.
        on_gpu: the network trains on a GPU (only checkpoint copies on the host).
        cache_bytes: ``sampler.cache_bytes`` per worker, ``None`` for a share of the budget.
        prepared: patches come from a prepared cache (no decoded-volume LRU).
        worker_bytes, val_bytes_per_voxel: the estimates (:data:`WORKER_BYTES`, :data:`VALIDATION_BYTES_PER_VOXEL`).
    """

    ranks: int
    workers: int
    volume_bytes: int
    dataset_bytes: int
    batch_bytes: int
    prefetch_factor: int = 2
    pin_memory: bool = False
    val_voxels: int = 0
    model_bytes: int = 0
    on_gpu: bool = False
    cache_bytes: int | None = None
    prepared: bool = False
    worker_bytes: int = WORKER_BYTES
    val_bytes_per_voxel: int = VALIDATION_BYTES_PER_VOXEL

    @property
    def n_caches(self) -> int:
        """Volume caches of the run: one per worker of every rank (the rank itself without workers)."""
        return self.ranks * max(self.workers, 1)


@dataclass(frozen=True)
class MemoryPlan:
    """A run's memory arithmetic: ``costs`` (bytes by item, the caches included) against ``budget``.

    ``cache_per_worker`` is each cache's bound (what ``VolumeCache`` gets); ``problem`` is ``None``
    when the run fits, else the one-line refusal (what to lower).
    """

    budget: int
    source: str
    costs: dict[str, int]
    cache_per_worker: int
    n_caches: int
    ranks: int
    workers: int
    prepared: bool
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.costs.values())

    @property
    def fits(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        """The line a run prints at start."""
        if self.prepared:
            head = (f"decoded-volume cache: none (prepared cache, memory-mapped, shared page cache) for "
                    f"{self.ranks} rank(s) x {self.workers} worker(s)")
        else:
            head = (f"decoded-volume cache: {fmt_bytes(self.costs.get('caches', 0))} across {self.ranks} rank(s) x "
                    f"{max(self.workers, 1)} {'worker(s)' if self.workers else 'process (no workers)'} "
                    f"({fmt_bytes(self.cache_per_worker)} each)")
        rest = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.costs.items() if k != "caches" and v)
        return (f"{head}; {rest}; {fmt_bytes(self.total)} of a {fmt_bytes(self.budget)} budget ({self.source})"
                + "".join(f"; {n}" for n in self.notes))


def _fixed_train_costs(x: TrainMemoryInputs) -> dict[str, int]:
    in_flight = x.ranks * (max(x.workers, 1) * x.prefetch_factor + 1) * x.batch_bytes
    host_model = x.model_bytes * (4 if x.on_gpu else 5)  # GPU: checkpoint copy of weights, EMA, optimizer x2
    return {"workers": x.ranks * x.workers * x.worker_bytes,
            "batches": in_flight * (2 if x.pin_memory else 1),
            "validation": x.val_voxels * x.val_bytes_per_voxel,
            "model": host_model * (1 if x.on_gpu else x.ranks)}


def _largest(costs: dict[str, int]) -> str:
    return max(costs, key=lambda k: costs[k])


_LOWER = {"workers": "train.num_workers", "batches": "train.batch_size or train.num_workers",
          "validation": "validation.n_volumes (the largest volume validated on rank 0)",
          "model": "the network (model.*) or the ranks"}


def plan_train_memory(x: TrainMemoryInputs, budget: int, source: str = "") -> MemoryPlan:
    """Split ``budget`` between the caches of ``x.n_caches`` workers after the fixed costs; say whether it fits.

    With ``x.cache_bytes`` ``None`` each cache gets ``(budget - fixed) / n_caches``, at most
    ``x.dataset_bytes``; the run is refused when that is below one volume (``x.volume_bytes``). With
    an explicit ``x.cache_bytes`` (counted as at most ``x.dataset_bytes``: an LRU never holds more than
    the training set) the run is refused when the caches and fixed costs exceed the budget.
    A prepared cache (``x.prepared``) holds no LRU: only the fixed costs are checked.
    """
    fixed = _fixed_train_costs(x)
    n = x.n_caches
    room = budget - sum(fixed.values())
    kw = dict(budget=budget, source=source, n_caches=n, ranks=x.ranks, workers=x.workers, prepared=x.prepared)
    if x.prepared:
        problem = None if room >= 0 else _refuse_fixed(fixed, budget)
        return MemoryPlan(costs={**fixed, "caches": 0}, cache_per_worker=0, problem=problem, **kw)
    if x.cache_bytes is None:
        per = max(0, min(room // n if room > 0 else 0, x.dataset_bytes))
        problem = None
        if per < x.volume_bytes:
            problem = _refuse_auto(x, fixed, budget, room)
            per = x.volume_bytes
        notes = [] if per < x.dataset_bytes else ["every training volume fits each cache"]
        return MemoryPlan(costs={**fixed, "caches": per * n}, cache_per_worker=per, problem=problem, notes=notes, **kw)
    per = max(min(int(x.cache_bytes), x.dataset_bytes), x.volume_bytes)  # an LRU never holds more than the data
    problem = None
    if room < per * n:
        fit = max(0, room // n)
        problem = (f"memory: sampler.cache_bytes {fmt_bytes(x.cache_bytes)} per worker x {n} worker(s) "
                   f"({x.ranks} rank(s) x {max(x.workers, 1)}) plus {fmt_bytes(sum(fixed.values()))} of "
                   f"{', '.join(k for k, v in fixed.items() if v)} exceed the {fmt_bytes(budget)} budget: lower "
                   f"sampler.cache_bytes to {int(fit)} ({fmt_bytes(fit)}) or null (a share of the budget), or "
                   f"use a prepared cache (python -m kaggle_utils prepare, sampler.prepared)")
        if fit < x.volume_bytes:
            problem = _refuse_auto(x, fixed, budget, room)
    return MemoryPlan(costs={**fixed, "caches": per * n}, cache_per_worker=per, problem=problem, **kw)


def _refuse_fixed(fixed: dict[str, int], budget: int) -> str:
    big = _largest(fixed)
    return (f"memory: the run needs {fmt_bytes(sum(fixed.values()))} ("
            + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in fixed.items() if v)
            + f") but the budget is {fmt_bytes(budget)}: lower {_LOWER[big]}, or raise train.memory_gb "
              f"(--memory-gb) if the machine has more")


def _refuse_auto(x: TrainMemoryInputs, fixed: dict[str, int], budget: int, room: int) -> str:
    """The refusal when not even one volume per worker fits: fewer workers, or a prepared cache."""
    if room < 0:
        return _refuse_fixed(fixed, budget)
    fewer = "lower train.num_workers, "
    for w in range(x.workers - 1, -1, -1):  # the most workers that fit, if any
        y = dataclasses.replace(x, workers=w)
        if budget - sum(_fixed_train_costs(y).values()) >= y.n_caches * y.volume_bytes:
            fewer = f"lower train.num_workers to {w}, "
            break
    return (f"memory: {x.n_caches} decoded-volume cache(s) ({x.ranks} rank(s) x {max(x.workers, 1)}) need at least "
            f"one volume ({fmt_bytes(x.volume_bytes)}) each, but {fmt_bytes(max(room, 0))} of the "
            f"{fmt_bytes(budget)} budget is left after {fmt_bytes(sum(fixed.values()))} of fixed costs: "
            f"{fewer}or use a prepared cache (python -m kaggle_utils prepare, sampler.prepared), "
            f"or raise train.memory_gb (--memory-gb)")


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictMemoryInputs:
    """What ``predict`` holds: ``n_models`` networks of ``model_bytes`` (all of them, float32), the
    largest test volume's ``voxels``, ``prefetch`` (the read-ahead queue's depth: ``prefetch + 1`` volumes,
    uint8 read and float32 normalized, wait beside the one predicted), and whether
    the networks run on a GPU (then only one model's weights pass through the host, while loading)."""

    n_models: int
    model_bytes: int
    voxels: int
    prefetch: int = 1
    on_gpu: bool = True
    bytes_per_voxel: int = PREDICT_BYTES_PER_VOXEL


def _predict_costs(x: PredictMemoryInputs, prefetch: int) -> dict[str, int]:
    per_model = x.model_bytes // max(1, x.n_models)
    return {"models": per_model if x.on_gpu else x.model_bytes,
            "volume": x.voxels * (x.bytes_per_voxel + (0 if x.on_gpu else 8)),
            "prefetch": (prefetch + 1 if prefetch else 0) * x.voxels * 5}  # queued + one in the loader's hand


def plan_predict_memory(x: PredictMemoryInputs, budget: int, source: str = "") -> tuple[int, dict[str, int], str | None]:
    """``(prefetch depth to use, costs, problem)``: ``x.prefetch`` when it fits, 0 (no read-ahead) when only
    that fits, else ``problem`` is the one-line refusal naming what to lower."""
    for depth in sorted({x.prefetch, 0}, reverse=True):
        costs = _predict_costs(x, depth)
        if sum(costs.values()) <= budget:
            return depth, costs, None
    costs = _predict_costs(x, 0)
    big = _largest(costs)
    what = {"models": "the ensemble (fewer --checkpoint files) or predict on the GPU (--device cuda)",
            "volume": "nothing of the settings: the largest test volume alone needs it (more memory, or --memory-gb)",
            "prefetch": "the read-ahead"}[big]
    return 0, costs, (f"memory: predict needs {fmt_bytes(sum(costs.values()))} ("
                      + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in costs.items() if v)
                      + f") but the budget is {fmt_bytes(budget)}{f' ({source})' if source else ''}: lower {what}")


# ----------------------------------------------------------------------------------------------
# Inputs of a real run (shapes from TIFF headers or a prepared manifest)
# ----------------------------------------------------------------------------------------------


def volume_shapes(records: Sequence[Any], prepared: Any = None, workers: int = 4) -> dict[str, tuple[int, ...]]:
    """``{id: (Z, Y, X)}`` of ``records``: from a prepared cache's manifest (``prepared``, a
    :class:`~kaggle_utils.prepare.PreparedVolumes`) where it holds the id, else from the image's TIFF
    header (no decoding; threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from .data import read_tiff_shape

    shapes: dict[str, tuple[int, ...]] = {}
    todo = []
    for rec in records:
        if prepared is not None and rec.id in prepared:
            shapes[rec.id] = prepared.shape(rec.id)
        else:
            todo.append(rec)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for rec, shape in zip(todo, pool.map(lambda r: read_tiff_shape(r.image_path), todo)):
            shapes[rec.id] = shape
    return shapes


def _voxels(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def train_memory_inputs(cfg: Any, train_ids: Sequence[str], val_ids: Sequence[str],
                        shapes: dict[str, tuple[int, ...]], model_bytes: int, ranks: int, on_gpu: bool,
                        prepared_labels: str | None = None) -> TrainMemoryInputs:
    """:class:`TrainMemoryInputs` of a :class:`~kaggle_utils.train.config.TrainConfig` ``cfg`` training on
    ``train_ids`` and validating ``val_ids`` (shapes from :func:`volume_shapes`).

    ``prepared_labels``: the label storage of the prepared cache (``npy``, ``packed``, ``blosc2``, ``none``), ``None``
    without one. A cache without labels keeps decoded labels in each worker's LRU: one byte per voxel.
    """
    tc, sc = cfg.train, cfg.sampler
    per_voxel = 2 if prepared_labels is None else (1 if prepared_labels == "none" else 0)
    vox = [_voxels(shapes[i]) for i in train_ids]
    patch = _voxels(sc.patch_size)
    return TrainMemoryInputs(
        ranks=ranks, workers=tc.num_workers, volume_bytes=max(vox, default=0) * max(per_voxel, 1),
        dataset_bytes=sum(vox) * max(per_voxel, 1), batch_bytes=tc.batch_size * patch * 5,
        prefetch_factor=2, pin_memory=on_gpu,
        val_voxels=max((_voxels(shapes[i]) for i in val_ids), default=0), model_bytes=model_bytes, on_gpu=on_gpu,
        cache_bytes=sc.cache_bytes, prepared=prepared_labels in ("npy", "packed", "blosc2"))
