"""What a training run records: its result, why it stopped, its metrics files and log lines.

* :class:`StopReason` and :class:`TrainResult` (``RUN_DIR/result.json``, read back with :meth:`TrainResult.load`);
* ``metrics.jsonl`` / ``metrics.csv`` (:func:`_write_metrics`, one row per epoch) and the epoch line
  (:func:`_epoch_line`);
* the log handlers of a run (:func:`_attach_log_handlers`): ``train.log`` and, when nothing shows the lines
  on the console yet, stdout. Every module of :mod:`kaggle_utils.train` logs through :data:`logger`
  (``kaggle_utils.train``), so the lines read the same as before the package was split.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataError, atomic_path

__all__ = ["StopReason", "TrainResult", "logger"]

#: The one logger of the training package (its records are named ``kaggle_utils.train``).
logger = logging.getLogger("kaggle_utils.train")
_PACKAGE_LOGGER = logging.getLogger("kaggle_utils")  # train.log gets other modules' warnings too


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
    """The :class:`StopReason` of a stored string, or the string when another version wrote it."""
    try:
        return StopReason(value)
    except ValueError:  # written by another version: keep the string
        return value


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` (one row per epoch, columns in first-seen order), atomically."""
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
    """``v`` formatted with ``spec``, ``-`` for ``None``."""
    return "-" if v is None else format(v, spec)


def _epoch_line(row: dict, epochs: int, part_names: list[str]) -> str:
    """The log line of one epoch: loss parts, lr, time and, after a validation, its numbers and verdict."""
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


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (torch's load errors run over many lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


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
    """Remove and close the handlers of :func:`_attach_log_handlers`."""
    for h in handlers:
        _PACKAGE_LOGGER.removeHandler(h)
        h.close()
