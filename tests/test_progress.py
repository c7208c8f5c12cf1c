"""Progress bars (kaggle_utils.progress): one builder, drawn only where someone watches, --no-progress everywhere."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kaggle_utils import progress
from kaggle_utils.progress import progress_bar, progress_wanted

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kaggle_utils"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)


def test_bars_only_where_someone_watches(no_env, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, a pipe
    assert not progress_wanted(True)
    monkeypatch.setattr(sys, "stderr", _Tty())  # a terminal
    assert progress_wanted(True) and not progress_wanted(False)  # --no-progress always wins
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(progress, "_in_notebook_kernel", lambda: True)  # a Jupyter kernel
    assert progress_wanted(True)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")  # Kaggle's "Save & Run All" / kaggle kernels push
    assert not progress_wanted(True)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert progress_wanted(True)


def test_environment_variable_forces_bars_off_or_on(no_env, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress_wanted(True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv(progress.ENV, "1")
    assert progress_wanted(True) and not progress_wanted(False)
    log = io.StringIO()
    bar = progress_bar(range(5), file=log, desc="x")
    assert not bar.disable and list(bar) == [0, 1, 2, 3, 4]
    assert bar.mininterval == progress.LOG_INTERVAL_S and bar.ascii  # forced on in a log: rare, plain redraws


def test_a_disabled_bar_still_iterates_and_counts_nothing(no_env, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(total=3, desc="quiet")
    bar.update(2)
    bar.close()
    assert bar.disable and list(progress_bar(iter("ab"))) == ["a", "b"]


def test_no_module_builds_tqdm_bars_itself():
    """One place builds progress bars; the others call progress_bar."""
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "progress.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\bfrom tqdm\b|\bimport tqdm\b|\btqdm\(", line)]
    assert not offenders, offenders


@pytest.mark.parametrize("command", ["synth", "check-data", "score", "predict", "train", "tune"])
def test_every_long_command_takes_no_progress(command):
    from kaggle_utils.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert any("--no-progress" in a.option_strings for a in sub.choices[command]._actions)


def test_a_command_piped_into_a_log_writes_no_carriage_returns(tmp_path):
    """What a Kaggle batch log or `torchrun ... | tee` sees: plain lines, no redrawn bar (tqdm's \\r)."""
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "kaggle_utils", "synth", "--out", str(tmp_path / "s"), "--size", "32",
            "--n-train", "2", "--n-test", "0"]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "\r" not in quiet.stdout + quiet.stderr and "synth:" not in quiet.stderr
    loud = subprocess.run(argv, capture_output=True, text=True, env={**env, progress.ENV: "1"}, timeout=300)
    assert loud.returncode == 0 and "synth" in loud.stderr  # forced on: the bar is there
