"""Smoke test of benchmarks/scale.py (the competition-scale benchmark of BENCHMARKS.md): ``--quick`` runs
every stage (synthetic LZW folder, prepare, 2-rank loaders from the prepared cache and from LZW, validation
with out-of-fold files, predict) at tiny sizes and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_benchmark_quick_runs_every_stage(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scale.py"), "--quick", "--work", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in res.stdout.splitlines() if line.startswith("| ")}
    for stage in ("build folder", "prepare", "loader prepared 2 ranks x 2 workers", "loader lzw 2 ranks x 1 workers",
                  "validate + OOF (CPU)", "predict (CPU)"):
        assert stage in rows, f"{stage} missing from the table:\n{res.stdout[-3000:]}"
    assert "errors 0" in rows["predict (CPU)"] and "projected to 786 volumes" in rows["prepare"]
    assert "Traceback" not in res.stderr
