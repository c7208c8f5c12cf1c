"""Does ``train --fold -1 --time-budget S`` end inside S for all folds together?

Generates a small synthetic set (``--n-train`` volumes of ``--size``^3, 3 scrolls, seed 0), runs the
CLI ``python -m kaggle_utils train --config smoke-cpu --fold -1 --time-budget S`` with ``--set``
overrides that make an epoch and a validation a few seconds on a CPU (32^3 patches, 4 patches per
epoch, one validated volume without the competition score), and prints the wall time of the whole
run, the load average before and after, and the run's budget lines (the split, and where each
fold's training phase ended). Before issue 25 every fold got the whole budget (3 folds x S).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/fold_budget.py --budget 60 --out /tmp/fold_budget``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from kaggle_utils.synthetic import generate_dataset

#: Overrides of smoke-cpu for a run whose floor (one epoch, one validation, the OOF pass) is small.
TINY = ["sampler.patch_size=[32,32,32]", "sampler.patches_per_epoch=4", "validation.patch_size=[32,32,32]",
        "validation.n_score=0", "validation.n_volumes=1", "validation.every=1", "validation.patience=null",
        "inference.patch_size=[32,32,32]", "train.epochs=100000", "model.decoder_channels=[16,16,8,8,4]"]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=60.0, help="--time-budget of the whole run (seconds)")
    ap.add_argument("--out", type=Path, required=True, help="work folder (data/ and run/)")
    ap.add_argument("--n-train", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    data = args.out / "data"
    if not (data / "train.csv").is_file():
        generate_dataset(data, n_train=args.n_train, n_test=1, size=args.size, n_scrolls=3, seed=0)
    cmd = [sys.executable, "-m", "kaggle_utils", "train", "--config", "smoke-cpu", "--fold", "-1",
           "--time-budget", f"{args.budget:g}", "--data-dir", str(data), "--out", str(args.out / "run"),
           "--no-progress", "--device", "cpu"] + [x for item in TINY for x in ("--set", item)]
    before = _load()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    print(f"budget {args.budget:g}s: wall {wall:.1f}s, exit {proc.returncode}, load before {before}, after {_load()}")
    for line in proc.stdout.splitlines():
        if "time budget" in line or "finished" in line:
            print("  " + line)
    if proc.returncode:
        print(proc.stderr[-2000:])


if __name__ == "__main__":
    main()
