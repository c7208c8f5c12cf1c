"""Which loss should be the default? Short CPU trainings on the synthetic set, label 2 ignored in all of them.

Every run uses the shipped config ``demo-cpu`` (slim resnet18 U-Net, 32^3 patches) on the same synthetic data and fold;
only the ``loss`` section differs. Reported: best and last local competition score on the validation volumes,
Dice on labelled voxels, seconds. Runs go two at a time, one torch thread each (2 cores).

    PYTHONPATH=. .venv/bin/python benchmarks/loss_choice.py --out /tmp/loss_choice
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "default (dice+bce+0.1 cldice)": {"loss.name": "default"},
    "dice+bce": {"loss.name": None, "loss.weights": {"dice": 1.0, "bce": 1.0}},
    "seed-v1 terms, label 2 ignored": {"loss.name": "seed-v1"},
    "seed-v2 terms, label 2 ignored": {"loss.name": "seed-v2"},
}


def run_one(name: str, args: argparse.Namespace) -> dict:
    import torch

    from kaggle_utils.train import load_train_config, train

    torch.set_num_threads(1)
    over = {"train.epochs": args.epochs, "validation.every": args.every, "train.seed": args.seed, **VARIANTS[name]}
    cfg = load_train_config("demo-cpu", over)
    t0 = time.time()
    res = train(cfg, Path(args.out) / "data", Path(args.out) / _slug(name), fold=0, progress=False)
    vals = [h for h in res.history if "val_score" in h]
    return {"name": name, "seconds": time.time() - t0, "best_score": res.best_score, "best_epoch": res.best_epoch,
            "last_score": vals[-1]["val_score"], "last_dice": vals[-1]["val_dice"],
            "scores": [round(h["val_score"], 4) for h in vals]}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:40]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/loss_choice")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.variant is not None:
        (out / f"{_slug(args.variant)}.json").write_text(json.dumps(run_one(args.variant, args)))
        return
    from kaggle_utils.synthetic import generate_dataset

    generate_dataset(out / "data", n_train=10, n_test=0, size=96, n_scrolls=4, seed=args.seed)
    names = list(VARIANTS)
    for i in range(0, len(names), 2):
        procs = [subprocess.Popen([sys.executable, __file__, "--out", str(out), "--epochs", str(args.epochs),
                                   "--every", str(args.every), "--seed", str(args.seed), "--variant", n])
                 for n in names[i:i + 2]]
        if any(p.wait() for p in procs):
            raise SystemExit("a training run failed")
    rows = [json.loads((out / f"{_slug(n)}.json").read_text()) for n in names]
    print(f"{'loss (label 2 ignored)':34} {'best score':>10} {'@epoch':>6} {'last score':>10} {'last dice':>9} {'s':>5}  scores")
    for r in rows:
        print(f"{r['name']:34} {r['best_score']:10.4f} {r['best_epoch']:6d} {r['last_score']:10.4f} "
              f"{r['last_dice']:9.4f} {r['seconds']:5.0f}  {r['scores']}")


if __name__ == "__main__":
    main()
