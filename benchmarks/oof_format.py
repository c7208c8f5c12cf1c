"""Out-of-fold probabilities on disk: float16 ``.npy`` against the compact uint8 ``.npz``, and what the
quantisation does to ``tune``'s choice.

1. A synthetic set (``--n-train`` volumes of ``--size``³, several scrolls) unless ``--data-dir`` exists.
2. A real (CPU-small) training run of every fold (``cpu-15min`` over ``--budget-s`` seconds per fold,
   ``--n-folds`` scroll-grouped folds) writing its out-of-fold probabilities in **float16**, unless
   ``--run`` already holds them; or, with ``--smoothed``, stand-in probabilities made from the labels
   (:func:`smoothed_run`, no training).
3. The same probabilities in the compact format (``probs.write_probs(fmt="uint8")`` of the float16
   values: codes ``round(p * 255)``).
4. ``tune`` (default space, coordinate descent) on each folder: chosen settings, best score, fold guard,
   and the largest score difference over the candidates both searches scored.
5. Disk per 320³ volume: the fold-0 model predicts one 320³ synthetic volume (``--volume-seed``); its
   probabilities are written in both formats (size, write and read seconds).

Run: ``PYTHONPATH=. nice .venv/bin/python benchmarks/oof_format.py --work /tmp/oof_format``
(defaults: 10 volumes of 128³, 2 folds, 150 s per fold; about 15 min on 2 cores). Results: BENCHMARKS.md,
"Out-of-fold probabilities on disk".
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaggle_utils.probs import as_probability, find_prob_files, read_probs, write_probs  # noqa: E402

MIB = 2**20


def make_data(root: Path, n_train: int, size: int, seed: int) -> Path:
    """The synthetic competition folder (generated once)."""
    from kaggle_utils.synthetic import generate_dataset

    if not (root / "train.csv").is_file():
        generate_dataset(root, n_train=n_train, n_test=0, size=size, n_scrolls=4, seed=seed)
    return root


def train_run(data: Path, run: Path, n_folds: int, budget_s: float) -> Path:
    """``cpu-15min`` on every fold, out-of-fold probabilities in float16 (skipped when ``run`` has them)."""
    from kaggle_utils.train import load_train_config, train_folds

    if run.is_dir() and find_prob_files(run):
        return run
    cfg = load_train_config("cpu-15min", {"train.n_folds": n_folds, "train.time_budget_s": budget_s,
                                          "validation.oof_format": "float16", "validation.n_volumes": None})
    train_folds(cfg, data, run, device="cpu", progress=False, verbose=False)
    return run


def smoothed_run(data: Path, run: Path, n_folds: int, seed: int) -> Path:
    """Stand-in out-of-fold probabilities without training ("smoothed labels"): a sigmoid of the blurred
    surface label (sigma 1) minus an offset, plus smooth noise (sigma 2) and a blurred copy of the image's
    bright sheet bodies, so thresholds move sheet thickness, dust and holes as a model's would."""
    from scipy import ndimage

    from kaggle_utils.data import load_index, make_folds, read_label, read_volume

    if run.is_dir() and find_prob_files(run):
        return run
    index = load_index(data, "train")
    folds = make_folds(index, n_folds)
    rng = np.random.default_rng(seed)
    for rec in index:
        label, image = read_label(rec.label_path), read_volume(rec.image_path).astype(np.float32)
        surf = ndimage.gaussian_filter((label == 1).astype(np.float32), 1.0)
        body = ndimage.gaussian_filter((image - image.mean()) / (image.std() + 1e-6), 1.5)
        noise = ndimage.gaussian_filter(rng.normal(size=label.shape).astype(np.float32), 2.0) * 4.0
        prob = 1.0 / (1.0 + np.exp(-(10.0 * surf + 0.8 * body + noise - 3.0)))
        write_probs(run / f"fold{folds[rec.id]}" / "oof", rec.id, rec.scroll_id, prob, folds[rec.id], fmt="float16")
    return run


def to_uint8(run: Path, out: Path) -> Path:
    """The float16 files of ``run`` rewritten in the compact format under ``out`` (same sidecars)."""
    import json

    for npy in find_prob_files(run):
        meta = json.loads(npy.with_suffix(".json").read_text())
        extra = {k: v for k, v in meta.items() if k not in ("id", "scroll_id", "fold", "shape", "dtype")}
        write_probs(out / npy.parent.relative_to(run), meta["id"], meta["scroll_id"],
                    as_probability(read_probs(npy)), meta.get("fold"), fmt="uint8", **extra)
    return out


def run_tune(probs_dir: Path, data: Path, workers: int):
    from kaggle_utils.tune import SearchSpace, load_labels, load_probs, tune

    probs = load_probs(probs_dir)
    labels = load_labels(data, [p.id for p in probs])
    t0 = time.perf_counter()
    res = tune(probs, labels, SearchSpace(), workers=workers, progress=False, curve=False)
    return res, time.perf_counter() - t0, sum(p.stat().st_size for p in find_prob_files(probs_dir))


def compare_tune(results: dict) -> None:
    a, b = results["float16"][0], results["uint8"][0]
    print("\n| format | files MiB | tune wall s | best score | chosen settings | fold guard (held-out of other folds' choice) |")
    print("|---|---|---|---|---|---|")
    for fmt, (res, wall, nbytes) in results.items():
        guard = "; ".join(f"fold {g.fold}: {g.held_out_score:.4f} ({_short(g.chosen)})" for g in res.fold_guard) or "-"
        print(f"| {fmt} | {nbytes / MIB:.2f} | {wall:.0f} | {res.best_score:.5f} | {_short(res.best)} | {guard} |")
    common = _common_scores(a, b)
    if common:
        diffs = np.array([abs(x - y) for x, y in common.values()])
        print(f"\n{len(common)} candidates scored by both: |score diff| max {diffs.max():.5f}, mean {diffs.mean():.5f}")
    print(f"same chosen settings: {_short(a.best) == _short(b.best)}; best score diff {b.best_score - a.best_score:+.5f}")


def _short(cfg) -> str:
    from dataclasses import asdict

    from kaggle_utils.postprocess import PostprocessConfig

    d, ref = asdict(cfg), asdict(PostprocessConfig())
    return ", ".join(f"{k}={v}" for k, v in d.items() if v != ref[k] or k == "threshold")


def _common_scores(a, b) -> dict:
    sa = {_short(c.cfg): c.score for c in a.candidates}
    sb = {_short(c.cfg): c.score for c in b.candidates}
    return {k: (sa[k], sb[k]) for k in sa.keys() & sb.keys()}


def disk_320(run: Path, work: Path, seed: int) -> None:
    """Both formats of the fold-0 model's probabilities on one 320³ synthetic volume."""
    from kaggle_utils.data import normalize_intensity
    from kaggle_utils.inference import predict_volume
    from kaggle_utils.models import load_checkpoint
    from kaggle_utils.synthetic import make_volume, scroll_style

    image, label = make_volume((320, 320, 320), seed, scroll_style("34117"))
    model, cfg, _ = load_checkpoint(next(run.rglob("best.pt")), map_location="cpu")
    t0 = time.perf_counter()
    prob = np.asarray(predict_volume([model.eval()], normalize_intensity(image), cfg.get("inference"), "cpu"),
                      dtype=np.float32)
    print(f"\n320^3 prediction: {time.perf_counter() - t0:.0f} s, foreground (p > 0.5) {float((prob > 0.5).mean()):.3f}, "
          f"labelled surface {float((label == 1).mean()):.3f}")
    print("| format | file MiB | write s | read + decode to float32 s | max |p - stored| |")
    print("|---|---|---|---|---|")
    for fmt in ("float16", "uint8"):
        t0 = time.perf_counter()
        path = write_probs(work / "disk320" / fmt, "v320", "34117", prob, 0, fmt=fmt)
        tw = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = as_probability(read_probs(path))
        tr = time.perf_counter() - t0
        print(f"| {fmt} | {path.stat().st_size / MIB:.2f} | {tw:.2f} | {tr:.2f} | {float(np.abs(back - prob).max()):.5f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/oof_format"))
    ap.add_argument("--data-dir", type=Path, default=None, help="default: WORK/data (generated)")
    ap.add_argument("--run", type=Path, default=None, help="default: WORK/run (trained)")
    ap.add_argument("--n-train", type=int, default=10)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--n-folds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--volume-seed", type=int, default=1)
    ap.add_argument("--skip-320", action="store_true")
    ap.add_argument("--smoothed", action="store_true",
                    help="stand-in probabilities from the labels (no training; see smoothed_run)")
    args = ap.parse_args()
    data = make_data(args.data_dir or args.work / "data", args.n_train, args.size, args.seed)
    t0 = time.perf_counter()
    if args.smoothed:
        run = smoothed_run(data, args.run or args.work / "smoothed", args.n_folds, args.seed)
    else:
        run = train_run(data, args.run or args.work / "run", args.n_folds, args.budget_s)
    print(f"float16 out-of-fold probabilities ({'smoothed labels' if args.smoothed else 'trained'}): "
          f"{time.perf_counter() - t0:.0f} s")
    u8 = run.parent / (run.name + "_uint8")
    shutil.rmtree(u8, ignore_errors=True)
    to_uint8(run, u8)
    results = {fmt: run_tune(d, data, args.workers) for fmt, d in (("float16", run), ("uint8", u8))}
    compare_tune(results)
    if not args.skip_320:
        disk_320(run, args.work, args.volume_seed)


if __name__ == "__main__":
    main()
