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

Distributions of the guard's number (mean predicted / labelled surface share per validation) over
several seeds, healthy (``fixed``) against collapsed (``seed-v2``) runs, replayed through
``collapse.CollapseGuard``: a table and ``docs/img/collapse_ratios.png``::

    PYTHONPATH=. .venv/bin/python benchmarks/collapse.py --out /tmp/collapse --seeds 0 1 2 --every 1
    PYTHONPATH=. .venv/bin/python benchmarks/collapse.py --ratios /tmp/collapse/seed0 /tmp/collapse/seed1 ...
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
                   if k not in ("run", "plot_only", "img_dir", "seeds", "ratios") and v is not None]
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
        cfg = load_train_config("smoke-cpu", {**base_overrides(args), **over})
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
    from kaggle_utils.probs import as_probability, find_prob_files, read_probs

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
        found = [f for f in find_prob_files(out / name / "oof", recursive=False) if f.stem == meta["id"]]
        prob = as_probability(read_probs(found[0]))  # {id}.npz (uint8 codes) or the old {id}.npy
        panels.append((f"{name}: probability", prob[z], "magma", (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, arr, cmap, lim) in zip(axes, panels):
        ax.imshow(arr, cmap=cmap, vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(img_dir / "collapse_slices.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# ratio distributions (the threshold rule of collapse.CollapseGuard is chosen from these)
# ----------------------------------------------------------------------------------------------


def _validations(run: dict) -> list[dict]:
    return [h for h in run["history"] if "val_dice" in h]


def ratio_report(runs_by_seed: dict[str, dict]) -> dict:
    """Per-validation predicted/labelled ratios of every run, and the guard replayed over each run.

    Args:
        runs_by_seed: ``{seed: collapse.json content}`` (``{"seed-v2": run, "fixed": run}`` each).

    Returns:
        ``{"rows": [...], "guard": [...]}``: one row per validation (seed, run, epoch, ratio,
        score), one guard outcome per run (state, flagged epochs, summary).
    """
    from kaggle_utils.collapse import CollapseGuard, collapse_verdict

    rows, guards = [], []
    for seed, results in runs_by_seed.items():
        for name, r in results.items():
            guard = CollapseGuard()
            for h in _validations(r):
                ratio = h["val_fg_pct"] / h["val_label_fg_pct"]
                rows.append({"seed": seed, "run": name, "epoch": h["epoch"], "ratio": ratio,
                             "fg_pct": h["val_fg_pct"], "score": h.get("val_score")})
                # the guard sees the mean shares (the per-volume spread is not in collapse.json)
                guard.update(collapse_verdict([h["val_fg_pct"] / 100], [h["val_label_fg_pct"] / 100]), h["epoch"])
            last = _validations(r)[-1]
            streak = longest = 0
            for h in guard.history:
                streak = streak + 1 if h["collapsed"] else 0
                longest = max(longest, streak)
            guards.append({"seed": seed, "run": name, "state": guard.state, "flagged": guard.flagged_epochs,
                           "longest_streak": longest,
                           "best_score": r["best_score"], "final_score": last.get("val_score"),
                           "summary": guard.summary()})
    return {"rows": rows, "guard": guards}


def print_ratio_report(rep: dict) -> None:
    rows = rep["rows"]
    epochs = sorted({r["epoch"] for r in rows})
    print("predicted / labelled surface share per validation (mean over the validation volumes)")
    print(f"{'epoch':>5} " + " ".join(f"{name + ' min/med/max':>24}" for name in ("fixed", "seed-v2")))
    for ep in epochs:
        cells = []
        for name in ("fixed", "seed-v2"):
            v = sorted(r["ratio"] for r in rows if r["run"] == name and r["epoch"] == ep)
            cells.append(f"{v[0]:7.2f} {float(np.median(v)):7.2f} {v[-1]:7.2f}   " if v else f"{'-':>24}")
        print(f"{ep:5d} " + " ".join(cells))
    for name in ("fixed", "seed-v2"):
        v = np.array([r["ratio"] for r in rows if r["run"] == name])
        last = np.array([r["ratio"] for r in rows if r["run"] == name and r["epoch"] >= max(epochs) - 2])
        if v.size:
            print(f"{name:8}: all {v.size} validations: min {v.min():.2f} median {np.median(v):.2f} max {v.max():.2f}"
                  f"; last 3 epochs: min {last.min():.2f} median {np.median(last):.2f} max {last.max():.2f}")
    print()
    print(f"{'seed':>5} {'run':8} {'state':>10} {'streak':>6} {'best':>6} {'final':>6}  guard summary")
    for g in rep["guard"]:
        print(f"{g['seed']:>5} {g['run']:8} {g['state']:>10} {g['longest_streak']:6d} {g['best_score']:6.3f} "
              f"{g['final_score']:6.3f}  {g['summary']}")


def plot_ratios(rep: dict, png: Path) -> None:
    from matplotlib.figure import Figure

    from kaggle_utils.data import atomic_path
    from kaggle_utils.collapse import COLLAPSE_MAX_RATIO, COLLAPSE_RECOVER_RATIO

    rows = rep["rows"]
    colors = {"seed-v2": "tab:red", "fixed": "tab:blue"}
    fig = Figure(figsize=(12, 4.2))
    ax_t, ax_h = fig.subplots(1, 2)
    for (seed, name) in sorted({(r["seed"], r["run"]) for r in rows}):
        pts = [(r["epoch"], r["ratio"]) for r in rows if r["seed"] == seed and r["run"] == name]
        ax_t.plot(*zip(*pts), "o-", ms=3, alpha=0.8, color=colors[name])
    for name, label in (("fixed", "healthy: label_mode ignore"), ("seed-v2", "collapsed: foreground + seed-v2 loss")):
        ax_t.plot([], [], "o-", color=colors[name], label=label)
    for ax in (ax_t,):
        ax.axhline(COLLAPSE_MAX_RATIO, color="k", ls="--", lw=1, label=f"flag above {COLLAPSE_MAX_RATIO:g}x")
        ax.axhline(COLLAPSE_RECOVER_RATIO, color="k", ls=":", lw=1, label=f"recovered at or below {COLLAPSE_RECOVER_RATIO:g}x")
    ax_t.set_ylim(0, None)
    ax_t.set_xlabel("epoch"), ax_t.set_ylabel("predicted / labelled surface share")
    ax_t.set_title("every validation (one line per seed)")
    ax_t.legend(fontsize=7)
    epochs = sorted({r["epoch"] for r in rows})
    bins = np.linspace(0, max(5.0, max(r["ratio"] for r in rows) * 1.05), 41)
    for name in ("fixed", "seed-v2"):
        early = [r["ratio"] for r in rows if r["run"] == name and r["epoch"] < max(epochs) - 2]
        late = [r["ratio"] for r in rows if r["run"] == name and r["epoch"] >= max(epochs) - 2]
        ax_h.hist(early, bins=bins, alpha=0.35, color=colors[name], label=f"{name}: earlier epochs")
        ax_h.hist(late, bins=bins, alpha=0.9, color=colors[name], histtype="step", lw=2, label=f"{name}: last 3 epochs")
    ax_h.axvline(COLLAPSE_MAX_RATIO, color="k", ls="--", lw=1)
    ax_h.axvline(COLLAPSE_RECOVER_RATIO, color="k", ls=":", lw=1)
    ax_h.set_xlabel("predicted / labelled surface share"), ax_h.set_ylabel("validations")
    ax_h.set_title("distribution")
    ax_h.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


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
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run both runs for each seed (OUT/seed{k}), then the ratio report of all of them")
    ap.add_argument("--ratios", nargs="+", default=None, metavar="DIR",
                    help="only the ratio report (table + IMG_DIR/collapse_ratios.png) from DIR/collapse.json files")
    args = ap.parse_args()
    out = Path(args.out)
    if args.run is not None:
        run_one(args, args.run)
        return
    if args.seeds is not None or args.ratios is not None:
        dirs = [Path(d) for d in args.ratios] if args.ratios else []
        for seed in args.seeds or []:
            sub = argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out / f"seed{seed}"),
                                        "seeds": None, "ratios": None})
            run(sub)
            dirs.append(out / f"seed{seed}")
        runs = {d.name: json.loads((d / "collapse.json").read_text()) for d in dirs}
        rep = ratio_report(runs)
        print_ratio_report(rep)
        plot_ratios(rep, Path(args.img_dir) / "collapse_ratios.png")
        (out.mkdir(parents=True, exist_ok=True), (out / "ratios.json").write_text(json.dumps(rep, indent=1)))
        return
    if args.plot_only:
        results = json.loads((out / "collapse.json").read_text())
    else:
        results = run(args)
    print_table(results)
    plot(results, out, Path(args.img_dir))


if __name__ == "__main__":
    main()
