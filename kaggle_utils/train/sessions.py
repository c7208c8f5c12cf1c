"""Kaggle sessions: several folds in turn (:func:`train_folds`, a whole run's time budget split between
them, :func:`fold_budget`); an earlier session's runs continued (:func:`stage_resume`); both GPUs with
``torchrun`` from a notebook (:func:`torchrun_command`, :func:`train_torchrun`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..data import DataError, atomic_path
from .config import TrainConfig, load_train_config
from .loop import train
from .record import TrainResult, _attach_log_handlers, _detach_log_handlers, _first_line, logger

__all__ = ["fold_budget", "budget_split_line", "train_folds", "stage_resume", "torchrun_command", "train_torchrun"]


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
# Continue an earlier session's runs; both GPUs with torchrun
# ----------------------------------------------------------------------------------------------


def _checkpoint_epoch(path: Path) -> int:
    """Epochs completed in checkpoint ``path``; :class:`DataError` when it is unreadable."""
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
