"""Benchmark of ``kaggle_utils.tune``: where the time of a post-processing search goes.

Builds ``--n-volumes`` synthetic labels (``kaggle_utils.synthetic.make_volume``) in ``--n-scrolls``
scrolls and model-like probabilities for them (:func:`simulate_prob`: blurred surface, scroll-specific
sharpness and noise, false-positive specks, weak spots inside sheets), writes them in the
out-of-fold format (``{id}.npy`` float16 + ``{id}.json``), and times

* **write**: saving the probabilities (not part of tuning),
* **load**: ``load_probs`` + the labels (done once per tuning run),
* **search**: ``tune`` with ``--workers`` processes, split into the summed CPU seconds of
  post-processing and of scoring inside the workers (``TuneResult.timings``).

``--method random --n-candidates 100`` runs the 9-threshold grid and then random candidates up to
100 in all (fewer when random draws repeat).

``--compare-halving``: successive halving (``tune --method halving``) against the exhaustive search
of the same pool (the threshold grid + random candidates, ``--n-candidates`` in all): both are run
for real once (wall time, (candidate, volume) pairs), then halving is replayed on the exhaustive
score matrix for ``--repeats`` volume orders (seeds) on the full set and on random subsets of
``--subset`` of the volumes, counting how often it picks the exhaustive winner of that set and how
far below the winner its pick scores. Examples::

    # the benchmark of BENCHMARKS.md ("Tuning")
    taskset -c 0,1 python benchmarks/tune.py --n-volumes 20 --size 160 --n-candidates 100 --workers 2
    # halving vs exhaustive (BENCHMARKS.md "Tuning")
    taskset -c 0,1 python benchmarks/tune.py --n-volumes 12 --size 96 --n-candidates 60 --compare-halving
    # the README figure
    python benchmarks/tune.py --n-volumes 12 --size 96 --method coordinate --plot docs/img/tune_threshold.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaggle_utils.synthetic import SCROLL_IDS, make_volume  # noqa: E402
from kaggle_utils.tune import (  # noqa: E402
    SearchSpace,
    _halving,
    _key,
    _volume_order,
    halving_schedule,
    load_probs,
    plot_threshold_curves,
    tune,
)


def simulate_prob(label: np.ndarray, seed: int, sharpness: float, noise: float, blur: float) -> np.ndarray:
    """Model-like ``float16 (Z, Y, X)`` probabilities for a label volume.

    The surface mask is blurred (``blur`` voxels: predictions come out too thick), turned into a
    logit with slope ``sharpness`` plus smooth noise of amplitude ``noise``; single-voxel and small
    false-positive specks and weak spots inside sheets are added, so dust removal and hole filling
    have something to do.
    """
    rng = np.random.default_rng(seed)
    fg = (label == 1).astype(np.float32)
    soft = ndimage.gaussian_filter(fg, blur)
    soft /= max(float(soft.max()), 1e-6)
    field = ndimage.gaussian_filter(rng.standard_normal(label.shape).astype(np.float32), 2.0)
    field /= max(float(field.std()), 1e-6)
    logit = sharpness * (soft - 0.55) + noise * field
    specks = rng.random(label.shape) < 1e-4  # false positives far from sheets
    logit[ndimage.binary_dilation(specks, iterations=int(rng.integers(0, 2)))] += 4.0
    weak = (rng.random(label.shape) < 2e-3) & (fg > 0)  # pinholes in sheets
    logit[weak] -= 3.0
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float16)


def build(out: Path, n_volumes: int, size: int, n_scrolls: int, seed: int) -> tuple[list[np.ndarray], float]:
    """Labels and ``{id}.npy``/``{id}.json`` probabilities under ``out``; returns labels and write seconds."""
    from kaggle_utils.synthetic import scroll_style

    rng = np.random.default_rng(seed)
    scrolls = [SCROLL_IDS[k % n_scrolls] for k in range(n_volumes)]
    per_scroll = {s: (rng.uniform(7, 12), rng.uniform(0.3, 0.9), rng.uniform(0.9, 1.5)) for s in set(scrolls)}
    labels, t_write = [], 0.0
    out.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(scrolls):
        _, label = make_volume((size,) * 3, seed=seed * 1000 + k, style=scroll_style(s, seed))
        labels.append(label)
        sharp, noise, blur = per_scroll[s]
        prob = simulate_prob(label, seed * 1000 + k, sharp, noise, blur)
        t0 = time.perf_counter()
        np.save(out / f"v{k:03d}.npy", prob)
        (out / f"v{k:03d}.json").write_text(json.dumps(
            {"id": f"v{k:03d}", "scroll_id": s, "fold": k % 5, "shape": list(prob.shape), "dtype": "float16"}))
        t_write += time.perf_counter() - t0
    return labels, t_write


class _Replay:
    """Stands in for tune's runner: means from a known ``(candidates, volumes)`` score matrix."""

    def __init__(self, cfgs, scores: np.ndarray, vols: list[int]):
        self.row = {_key(c): j for j, c in enumerate(cfgs)}
        self.scores, self.vols, self.pairs = scores, vols, set()

    def evaluate(self, cfgs, stage, vols=None):
        vols = [self.vols[i] for i in (range(len(self.vols)) if vols is None else vols)]
        self.pairs |= {(self.row[_key(c)], v) for c in cfgs for v in vols}
        return [float(self.scores[self.row[_key(c)], vols].mean()) for c in cfgs]


def compare_halving(probs, labels, space: SearchSpace, workers: int, repeats: int, subset: float, seed: int) -> None:
    """Real halving and exhaustive runs, then replays of halving on the exhaustive score matrix."""
    space.method = "exhaustive"
    full = tune(probs, labels, space, workers=workers, seed=seed, progress=False)
    space.method = "halving"
    half = tune(probs, labels, space, workers=workers, seed=seed, progress=False)
    n_pool = len(full.candidates)
    print(f"pool {n_pool} candidates x {len(probs)} volumes; halving eta {space.halving_eta}, first rung "
          f"{space.halving_min_volumes} volume(s): rungs {halving_schedule(n_pool, len(probs), space.halving_eta, space.halving_min_volumes)}")
    print("| search | wall s | (candidate, volume) pairs | best score | same pick as exhaustive |")
    print("|---|---|---|---|---|")
    print(f"| exhaustive | {full.timings['wall']:.1f} | {full.n_tasks} | {full.best_score:.4f} | - |")
    print(f"| halving | {half.timings['wall']:.1f} | {half.n_tasks} | {half.best_score:.4f} | "
          f"{'yes' if _key(half.best) == _key(full.best) else 'no'} |")
    cfgs = [c.cfg for c in full.candidates]
    mat = full.scores[:, :, 0]
    groups = [p.fold for p in probs]
    rng = np.random.default_rng(seed)
    # the replay has every score already: the bounds (same picks by construction) would save nothing
    replay_space = dataclasses.replace(space, halving_bounds=False)
    for label, frac in (("all volumes", 1.0), (f"random {int(round(100 * subset))}% subsets", subset)):
        hits, gaps, pairs = 0, [], []
        for r in range(repeats):
            k = max(2, int(round(frac * len(probs))))
            vols = sorted(rng.choice(len(probs), size=k, replace=False).tolist()) if frac < 1 else list(range(len(probs)))
            replay = _Replay(cfgs, mat, vols)
            pick, _ = _halving(replay, replay_space, cfgs, _volume_order([groups[v] for v in vols], seed + 1 + r))
            means = mat[:, vols].mean(axis=1)
            winner = int(np.argmax(means))
            hits += int(replay.row[_key(pick)] == winner)
            gaps.append(float(means[winner] - means[replay.row[_key(pick)]]))
            pairs.append(len(replay.pairs) / (len(cfgs) * len(vols)))
        print(f"replay, {label}: {repeats} volume orders; halving picks the exhaustive winner {hits}/{repeats}; "
              f"score below the winner: mean {np.mean(gaps):.4f}, max {np.max(gaps):.4f}; pairs scored "
              f"{100 * np.mean(pairs):.0f}% of exhaustive's")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-volumes", type=int, default=20)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--n-scrolls", type=int, default=4)
    ap.add_argument("--n-candidates", type=int, default=100, help="method random: grid + random, in all")
    ap.add_argument("--method", choices=("random", "coordinate"), default="random")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="save the threshold plot here")
    ap.add_argument("--table", action="store_true", help="print the tune table too")
    ap.add_argument("--compare-halving", action="store_true", help="halving vs exhaustive on the same pool")
    ap.add_argument("--repeats", type=int, default=20, help="--compare-halving: replayed volume orders")
    ap.add_argument("--subset", type=float, default=0.75, help="--compare-halving: share of volumes per subset")
    ap.add_argument("--eta", type=int, default=3, help="--compare-halving: halving_eta")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        labels, t_write = build(Path(tmp), args.n_volumes, args.size, args.n_scrolls, args.seed)
        t_build = time.perf_counter() - t0 - t_write
        t1 = time.perf_counter()
        probs = load_probs(tmp)
        for p in probs:
            p.prob = np.ascontiguousarray(p.prob)
        t_load = time.perf_counter() - t1
        space = SearchSpace()
        if args.compare_halving:
            space.n_random = max(1, args.n_candidates - len(space.threshold))
            space.halving_eta = args.eta
            compare_halving(probs, labels, space, args.workers, args.repeats, args.subset, args.seed)
            return 0
        if args.method == "random":
            space.method = "random"
            space.n_random = max(1, args.n_candidates - len(space.threshold))
        res = tune(probs, labels, space, workers=args.workers, seed=args.seed, progress=False)

    tm = res.timings
    n_cand = len(res.candidates)
    busy = tm["postprocess"] + tm["score"]
    print(f"{args.n_volumes} volumes of {args.size}^3, {args.n_scrolls} scrolls, method {args.method}, "
          f"{args.workers} worker(s); {n_cand} distinct candidates, {res.n_tasks} (candidate, volume) tasks")
    print(f"{'phase':<28} {'seconds':>9} {'share':>7}")
    print(f"{'synthesize (not tuning)':<28} {t_build:9.1f}")
    print(f"{'write probs (not tuning)':<28} {t_write:9.2f}")
    total = t_load + tm["wall"]
    print(f"{'load probs (once)':<28} {t_load:9.2f} {100 * t_load / total:6.1f}%")
    print(f"{'search wall':<28} {tm['wall']:9.1f} {100 * tm['wall'] / total:6.1f}%")
    for name in ("postprocess", "score"):
        print(f"{'  worker CPU ' + name:<28} {tm[name]:9.1f} {100 * tm[name] / max(busy, 1e-9):6.1f}% of worker time")
    print(f"{'  per task (pp + score)':<28} {busy / max(res.n_tasks, 1):9.3f}")
    print(f"best {res.best_score:.4f}: {res.best}")
    if args.table:
        print(res.format_table())
    if args.plot is not None:
        plot_threshold_curves(res, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
