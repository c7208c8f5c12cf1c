"""Reproduce the seed's collapse on synthetic data and show that ignoring label 2 avoids it.

Two training runs that differ only in how labels enter the loss:

* ``seed-v2``: ``train.label_mode: foreground`` (label 2 counted as surface) + the seed's V2 loss;
* ``fixed``:   ``train.label_mode: ignore`` (label 2 excluded) + the default loss (Dice + BCE + clDice).

Same synthetic data, model, sampler, optimizer, seed and validation. Every validation reports
Dice on labelled voxels, the local competition score (true labels, label 2 ignored as Kaggle does),
the predicted foreground share and the collapse guard's verdict. Prints a table, writes
``OUT/collapse.json`` and the figures ``docs/img/collapse_curves.png``, ``docs/img/collapse_slices.png``.

Run (the two runs in parallel, one thread each; about 15 minutes on 2 shared CPU cores)::

    PYTHONPATH=. .venv/bin/python benchmarks/collapse.py --out /tmp/collapse
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)

REPO = Path(__file__).resolve().parents[1]

RUNS = {
    "seed-v2": {"train.label_mode": "foreground", "loss.name": "seed-v2"},
    "fixed": {"train.label_mode": "ignore", "loss.name": "default"},
}


def base_overrides(args: argparse.Namespace) -> dict:
    p = args.patch
    return {
        "model.decoder_channels": [32, 32, 16, 16, 8],
        "sampler.patch_size": [p, p, p],
        "sampler.patches_per_epoch": args.patches,
        "sampler.surface_share": 0.7,
        "optim.lr": 0.002,
        "optim.warmup_epochs": 1,
        "train.epochs": args.epochs,
        "train.batch_size": 2,
        "train.num_workers": 0,
        "train.n_folds": args.n_folds,
        "train.seed": args.seed,
        "validation.every": args.every,
        "validation.n_volumes": None,
        "validation.n_score": 99,
        "validation.patch_size": [p, p, p],
        "validation.overlap": 0.0,
        "validation.batch_size": 2,
        "validation.patience": None,
        "validation.on_collapse": "warn",
        "inference.patch_size": [p, p, p],
        "postprocess.threshold": 0.5,
        "postprocess.min_component_size": 0,
    }


def run(args: argparse.Namespace) -> dict:
    """Both runs, each in its own process with ``--threads`` threads (default 1), in parallel."""
    import subprocess
    import sys

    from kaggle_utils.synthetic import generate_dataset

    out = Path(args.out)
    generate_dataset(out / "data", n_train=args.n_train, n_test=1, size=args.size, n_scrolls=args.n_folds,
                     seed=args.seed)
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("run", "plot_only", "img_dir") and v is not None]
    procs = [subprocess.Popen([sys.executable, __file__, *passthrough, f"--run={name}"]) for name in RUNS]
    if any(p.wait() for p in procs):
        raise SystemExit("a training run failed")
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in RUNS}
    (out / "collapse.json").write_text(json.dumps(results, indent=1))
    return results


def run_one(args: argparse.Namespace, name: str) -> dict:
    import torch

    from kaggle_utils.train import load_train_config, train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data"
    results = {}
    for name, over in [(name, RUNS[name])]:
        cfg = load_train_config(REPO / "configs" / "smoke-cpu.yaml", {**base_overrides(args), **over})
        t0 = time.time()
        res = train(cfg, data, out / name, fold=args.fold, progress=False)
        vals = [r for r in res.history if "val_dice" in r]
        first = next((r["epoch"] for r in vals if r["collapse"] != "healthy"), None)
        results[name] = {
            "label_mode": cfg.train.label_mode, "loss": cfg.loss.name, "seconds": time.time() - t0,
            "first_collapse_epoch": first,
            "first_collapse_kind": next((r["collapse"] for r in vals if r["collapse"] != "healthy"), None),
            "n_validations": len(vals), "best_score": res.best_score, "best_epoch": res.best_epoch,
            "history": res.history, "threads": args.threads,
        }
    (out / f"{name}.json").write_text(json.dumps(results[name], indent=1))
    return results


def print_table(results: dict) -> None:
    print(f"{'run':8} {'epoch':>5} {'loss':>8} {'val dice':>8} {'score':>7} {'topo':>6} {'SD':>6} {'VOI':>6} "
          f"{'fg %':>7} {'label %':>7}  verdict")
    for name, r in results.items():
        for h in r["history"]:
            if "val_dice" not in h:
                continue
            print(f"{name:8} {h['epoch']:5d} {h['train_loss']:8.4f} {h['val_dice']:8.4f} {h['val_score']:7.4f} "
                  f"{h['val_topo']:6.3f} {h['val_sd']:6.3f} {h['val_voi']:6.3f} {h['val_fg_pct']:7.2f} "
                  f"{h['val_label_fg_pct']:7.2f}  {h['collapse']}")
    print()
    print(f"{'run':8} {'label_mode':>10} {'loss':>8} {'guard fired':>11} {'best score':>10} {'final score':>11} "
          f"{'final fg %':>10} {'time s':>7}")
    for name, r in results.items():
        last = [h for h in r["history"] if "val_dice" in h][-1]
        fired = f"epoch {r['first_collapse_epoch']}" if r["first_collapse_epoch"] else "never"
        print(f"{name:8} {r['label_mode']:>10} {r['loss']:>8} {fired:>11} {r['best_score']:10.4f} "
              f"{last['val_score']:11.4f} {last['val_fg_pct']:10.2f} {r['seconds']:7.0f}")


def plot(results: dict, out: Path, img_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kaggle_utils.data import load_index, read_label, read_volume

    img_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"seed-v2": "tab:red", "fixed": "tab:blue"}
    for name, r in results.items():
        v = [h for h in r["history"] if "val_dice" in h]
        ep = [h["epoch"] for h in v]
        axes[0].plot(ep, [h["val_score"] for h in v], "o-", color=colors[name], label=f"{name} ({r['label_mode']}, {r['loss']})")
        axes[1].plot(ep, [h["val_dice"] for h in v], "o-", color=colors[name], label=name)
        axes[2].plot(ep, [h["val_fg_pct"] for h in v], "o-", color=colors[name], label=f"{name} predicted")
        bad = [h for h in v if h["collapse"] != "healthy"]
        axes[2].scatter([h["epoch"] for h in bad], [h["val_fg_pct"] for h in bad], s=120, facecolors="none",
                        edgecolors="k", zorder=3, label="guard fired" if name == "seed-v2" else None)
    v = [h for h in next(iter(results.values()))["history"] if "val_dice" in h]
    axes[2].plot([h["epoch"] for h in v], [h["val_label_fg_pct"] for h in v], "k--", label="labelled surface")
    for ax, title in zip(axes, ["local competition score", "Dice on labelled voxels", "foreground % of labelled voxels"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(img_dir / "collapse_curves.png", dpi=110)
    plt.close(fig)

    # middle slice of one validation volume: image, label, OOF probability of each run
    oof = sorted((out / "fixed" / "oof").glob("*.json"))
    if not oof:
        return
    meta = json.loads(oof[0].read_text())
    index = load_index(out / "data", "train")
    rec = index.by_id(meta["id"])
    image, label = read_volume(rec.image_path), read_label(rec.label_path)
    z = image.shape[0] // 2
    panels = [("image", image[z], "gray", None), ("label (0 bg, 1 surface, 2 ignore)", label[z], "viridis", (0, 2))]
    for name in results:
        prob = np.load(out / name / "oof" / f"{meta['id']}.npy").astype(np.float32)
        panels.append((f"{name}: probability", prob[z], "magma", (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, arr, cmap, lim) in zip(axes, panels):
        ax.imshow(arr, cmap=cmap, vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(img_dir / "collapse_slices.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/collapse", help="work folder (data, runs, collapse.json)")
    ap.add_argument("--img-dir", default=str(REPO / "docs" / "img"), help="where the PNG figures go")
    ap.add_argument("--size", type=int, default=64, help="synthetic volume edge")
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--n-folds", type=int, default=4, help="also the number of synthetic scrolls")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--patch", type=int, default=32, help="training/validation patch edge (multiple of 32)")
    ap.add_argument("--patches", type=int, default=28, help="patches per epoch")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--every", type=int, default=2, help="validate every N epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the two runs run in parallel)")
    ap.add_argument("--run", choices=sorted(RUNS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true", help="redraw the figures from OUT/collapse.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.run is not None:
        run_one(args, args.run)
        return
    if args.plot_only:
        results = json.loads((out / "collapse.json").read_text())
    else:
        results = run(args)
    print_table(results)
    plot(results, out, Path(args.img_dir))


if __name__ == "__main__":
    main()
