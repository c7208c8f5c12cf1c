"""Which training recipe scores best on held-out synthetic volumes after a fixed CPU time budget?

Trains each recipe for the same wall-clock budget (``--budget`` seconds, one after another, on
``--threads`` CPU threads) on every training volume of a synthetic dataset (``kaggle_utils synth``
layout: ``--n-train`` volumes of ``--size``^3, 4 scroll styles; ``--fold all``, no validation), then
predicts the held-out test volumes (``test_images/`` + ``test_labels/``, never trained on) with the
recipe's ``inference`` and ``postprocess`` settings and scores them with the local competition scorer
(:func:`kaggle_utils.metrics.score_volume`). Prints a Markdown table: mean score and its three parts
(TopoScore, SurfaceDice, VOI score), optimizer steps, training seconds and the 1-minute load average
before and after the recipe (the machine is shared; a loaded machine gives a recipe fewer steps).

Recipes (all CPU-sized; 32^3 patches, batch 2, the default Dice + BCE + 0.1 clDice loss, label 2 ignored):

- ``smp-epochs``: the shipped ``demo-cpu`` config as it is (slim resnet18 U-Net, AdamW + cosine over
  its 16 epochs; the budget only as a hard stop),
- ``smp-budget``: the same with the cosine schedule planned over the time budget,
- ``resenc-ds-sgd``: a CPU-sized ResEnc U-Net (5 stages, features 8..64), deep supervision,
  SGD (Nesterov, momentum 0.99, lr 1e-2, wd 3e-5) + poly, gradient clipping at 12, time budget,
- ``resenc-sgd``: the same without deep supervision,
- ``resenc-ds-adamw``: deep supervision with AdamW (lr 2e-3) + cosine, time budget,
- ``plain-ds-sgd``: the CPU-sized PlainConv U-Net, deep supervision, SGD + poly, time budget.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/recipes.py --budget 180 --out /tmp/recipes``
(``--recipes a,b`` for a subset). The 15-minute question of ``cpu-15min.yaml`` is ``--budget 900``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from kaggle_utils.config import from_dict, to_dict
from kaggle_utils.data import normalize_intensity, read_label, read_volume
from kaggle_utils.inference import predict_volume
from kaggle_utils.metrics import score_volume
from kaggle_utils.models import load_checkpoint, model_divisor
from kaggle_utils.postprocess import postprocess
from kaggle_utils.synthetic import generate_dataset
from kaggle_utils.train import TrainConfig, load_train_config, train

RESENC_CPU = {"arch": "ResEncUNet", "n_stages": 5, "features_per_stage": [8, 16, 32, 64, 64],
              "strides": [1, 2, 2, 2, 2], "n_blocks_per_stage": [1, 2, 2, 2, 2],
              "n_conv_per_stage_decoder": [1, 1, 1, 1]}
PLAIN_CPU = {"arch": "PlainConvUNet", "n_stages": 5, "features_per_stage": [8, 16, 32, 64, 64],
             "strides": [1, 2, 2, 2, 2], "n_blocks_per_stage": [2, 2, 2, 2, 2],
             "n_conv_per_stage_decoder": [1, 1, 1, 1]}
SGD_POLY = {"name": "SGD", "lr": 0.01, "momentum": 0.99, "weight_decay": 3e-5, "schedule": "poly",
            "warmup_epochs": 0, "grad_clip": 12.0}
ADAMW_COSINE = {"name": "AdamW", "lr": 0.002, "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 1,
                "grad_clip": 1.0}

#: name -> (changes to demo-cpu, whether the LR schedule follows the time budget)
RECIPES: dict[str, tuple[dict, bool]] = {
    "smp-epochs": ({}, False),
    "smp-budget": ({"train": {"epochs": 100000}}, True),
    "resenc-ds-sgd": ({"model": RESENC_CPU, "loss": {"deep_supervision": True}, "optim": SGD_POLY,
                       "train": {"epochs": 100000}}, True),
    "resenc-sgd": ({"model": RESENC_CPU, "optim": SGD_POLY, "train": {"epochs": 100000}}, True),
    "resenc-ds-adamw": ({"model": RESENC_CPU, "loss": {"deep_supervision": True}, "optim": ADAMW_COSINE,
                         "train": {"epochs": 100000}}, True),
    "plain-ds-sgd": ({"model": PLAIN_CPU, "loss": {"deep_supervision": True}, "optim": SGD_POLY,
                      "train": {"epochs": 100000}}, True),
}


def recipe_config(name: str) -> TrainConfig:
    """``demo-cpu`` with the recipe's changes, trained on every volume (no validation)."""
    changes, _ = RECIPES[name]
    data = to_dict(load_train_config("demo-cpu"))
    for section, values in changes.items():
        if section == "model":
            data["model"] = copy.deepcopy(values)
        else:
            data[section].update(copy.deepcopy(values))
    data["train"].update(n_folds=1, check_labels=False)
    data["train"]["budget_reserve"] = 0.0
    return from_dict(TrainConfig, data)


def score_test(run_dir: Path, data_dir: Path) -> dict:
    """Mean score and parts of ``run_dir/last.pt`` on the test volumes (with labels) of ``data_dir``."""
    model, cfg_dict, _ = load_checkpoint(run_dir / "last.pt")
    cfg = from_dict(TrainConfig, cfg_dict)
    ids = [row["id"] for row in csv.DictReader(open(data_dir / "test.csv"))]
    scores = []
    for vid in ids:
        image = read_volume(data_dir / "test_images" / f"{vid}.tif")
        label = read_label(data_dir / "test_labels" / f"{vid}.tif")
        x = normalize_intensity(image, mode=cfg.sampler.normalization)
        prob = predict_volume(model, x, cfg.inference, torch.device("cpu"), pad_multiple=model_divisor(cfg.model))
        s = score_volume(postprocess(np.asarray(prob), cfg.postprocess), label)
        scores.append((s.score, s.topo_score, s.surface_dice, s.voi_score))
    m = np.mean(np.array(scores, dtype=float), axis=0)
    return {"score": m[0], "topo": m[1], "sd": m[2], "voi": m[3], "n_test": len(ids)}


def run_recipe(name: str, data_dir: Path, out: Path, budget: float) -> dict:
    cfg = recipe_config(name)
    _, planned = RECIPES[name]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    result = train(cfg, data_dir, out / name, fold="all", progress=False, verbose=False,
                   time_budget=budget if planned else None, time_limit=None if planned else budget)
    seconds = time.monotonic() - t0
    if not (out / name / "last.pt").is_file():  # the hard limit ended the first epoch: nothing to score
        return {"recipe": name, "steps": 0, "epochs": 0, "train_s": seconds, "stopped": str(result.stopped),
                "load_before": load_before, "load_after": os.getloadavg()[0], "score": float("nan"),
                "topo": float("nan"), "sd": float("nan"), "voi": float("nan"), "n_test": 0}
    ckpt = torch.load(out / name / "last.pt", map_location="cpu", weights_only=True)
    steps = int(ckpt["scheduler"]["step_count"])
    row = {"recipe": name, "steps": steps, "epochs": result.epochs_completed, "train_s": seconds,
           "stopped": str(result.stopped), "load_before": load_before}
    row.update(score_test(out / name, data_dir))
    row["load_after"] = os.getloadavg()[0]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds per recipe")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=Path("/tmp/recipes"))
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of " + ",".join(RECIPES))
    ap.add_argument("--n-train", type=int, default=10)
    ap.add_argument("--n-test", type=int, default=3)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = args.out / "data"
    if not (data_dir / "train.csv").is_file():
        generate_dataset(data_dir, n_train=args.n_train, n_test=args.n_test, size=args.size, n_scrolls=4, seed=0)
    rows = []
    for name in args.recipes.split(","):
        row = run_recipe(name, data_dir, args.out, args.budget)
        rows.append(row)
        with open(args.out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\n{len(rows)} recipe(s), {args.budget:.0f} s budget each, {args.threads} threads; "
          f"test: {rows[0]['n_test']} held-out synthetic volumes of {args.size}^3\n")
    print("| recipe | score | topo | surface dice | voi | optimizer steps | epochs | train s | stop | load 1-min before/after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["score"]):
        print(f"| {r['recipe']} | {r['score']:.4f} | {r['topo']:.3f} | {r['sd']:.3f} | {r['voi']:.3f} | {r['steps']} | "
              f"{r['epochs']} | {r['train_s']:.0f} | {r['stopped']} | {r['load_before']:.1f}/{r['load_after']:.1f} |")


if __name__ == "__main__":
    main()
