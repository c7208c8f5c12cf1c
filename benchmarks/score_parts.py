"""Per-part cost of ``score_volume`` on a model-like 320^3 pair, for the ``fast`` and ``reference`` TopoScore.

The pair: a synthetic label volume (``kaggle_utils.synthetic.make_volume``, seed ``--seed``) as the ground
truth, and a prediction made the way a segmentation model's thresholded output looks: the label's surface
(label 1) blurred (Gaussian, sigma 1.2, peak 1), plus smooth noise (Gaussian-filtered white noise, sigma 4,
0.15 std) and fine noise (sigma 1.5, 0.05 std), thresholded
so that the predicted share is 1.4x the labelled share (a real CPU model predicted 23-25 % against 15-18 %
labelled), then 400 specks of dust (balls of radius 1-2.5 anywhere) and 80 holes (balls of radius 2-5
removed on the surface). The pair is cached as ``--cache`` (npz) so that every run times the same arrays.

Parts (each the minimum over ``--repeat`` calls, numba warmed up first): ``preprocess``; ``topo`` with its
per-part CPU seconds summed over the octants (closed forms, dim 0, dim 2 = dual union-find passes and
clearings, dim 1); ``surface_dice``; ``voi``; the whole ``score_volume``, also with a filled
``GroundTruthCache`` (what ``tune``'s candidates after the first pay), and the parts with the GT's side cached. Wall and CPU (process) seconds;
the 1-minute load average before and after each case is printed (the machine may be shared).

Run: ``PYTHONPATH=. python benchmarks/score_parts.py [--size 320] [--repeat 3] [--methods reference fast]``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage


def model_like_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(pred uint8 {0,1}, labels uint8 {0,1,2})`` of shape ``(size,)*3`` (see the module docstring)."""
    from kaggle_utils.synthetic import make_volume

    labels_file = Path(f"/tmp/score_parts_labels_{size}_{seed}.npy")  # make_volume takes ~1 min at 320^3
    if labels_file.exists():
        labels = np.load(labels_file)
    else:
        labels = make_volume((size,) * 3, seed=seed)[1]
        np.save(labels_file, labels)
    rng = np.random.default_rng(seed + 1)
    surf = labels == 1
    prob = ndimage.gaussian_filter(surf.astype(np.float32), 1.2)
    prob /= prob.max()
    for amplitude, sigma in ((0.15, 4.0), (0.05, 1.5)):  # smooth and fine noise, unit std before scaling
        noise = ndimage.gaussian_filter(rng.standard_normal(surf.shape).astype(np.float32), sigma)
        prob += amplitude / noise.std() * noise
    pred = prob > np.quantile(prob, 1 - 1.4 * surf.mean())
    shape = np.array(surf.shape)
    pts = np.argwhere(surf)
    for centre_of, n, r_lo, r_hi, value in ((None, 400, 1.0, 2.5, True), (pts, 80, 2.0, 5.0, False)):
        for _ in range(n):
            c = rng.integers(0, shape) if centre_of is None else centre_of[rng.integers(len(centre_of))]
            r = rng.uniform(r_lo, r_hi)
            lo = np.maximum(c - int(np.ceil(r)), 0)
            hi = np.minimum(c + int(np.ceil(r)) + 1, shape)
            g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            ball = sum((g[a] - c[a]) ** 2 for a in range(3)) <= r * r
            box = pred[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            box[ball] = value
    return pred.astype(np.uint8), labels


def load_pair(size: int, seed: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cached pair, built and saved first if ``cache`` does not exist."""
    if cache.exists():
        with np.load(cache) as z:
            return z["pred"], z["labels"]
    pred, labels = model_like_pair(size, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, pred=pred, labels=labels)
    os.replace(tmp, cache)
    return pred, labels


def timed(fn, repeat: int):
    """``(result, min wall s, min CPU s)`` over ``repeat`` calls of ``fn()``."""
    wall = cpu = float("inf")
    for _ in range(max(repeat, 1)):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return out, wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["reference", "fast"])
    ap.add_argument("--workers", type=int, default=2, help="octant threads of topo_counts")
    ap.add_argument("--cache", type=Path, default=None, help="npz of the pair (default /tmp/score_parts_{size}_{seed}.npz)")
    args = ap.parse_args()
    from kaggle_utils.metrics import GroundTruthCache, preprocess, score_volume, surface_dice, topo, voi
    from kaggle_utils.metrics.score import SD_TOLERANCE, VOI_ALPHA

    cache = args.cache or Path(f"/tmp/score_parts_{args.size}_{args.seed}.npz")
    t0 = time.perf_counter()
    pred, labels = load_pair(args.size, args.seed, cache)
    pb, gb = preprocess(pred, labels)
    print(f"pair {pred.shape}: predicted {pb.mean():.3%}, labelled {gb.mean():.3%}, ignored {(labels == 2).mean():.3%} "
          f"({time.perf_counter() - t0:.1f} s to load/build)")
    warm = slice(0, 40)
    for method in args.methods:  # numba compile / cache load
        topo.topo_counts(pb[warm, warm, warm], gb[warm, warm, warm], method=method)
    surface_dice(pb[warm, warm, warm], gb[warm, warm, warm])
    print("| method | part | wall s | CPU s | note |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        load = os.getloadavg()[0]
        _, w, c = timed(lambda: preprocess(pred, labels), args.repeat)
        print(f"| {method} | preprocess | {w:.2f} | {c:.2f} | |")
        best: dict[str, float] = {}

        def run_topo():
            parts: dict[str, float] = {}
            out = topo.topo_counts(pb, gb, workers=args.workers, method=method, timings=parts)
            for k, v in parts.items():
                best[k] = min(best.get(k, float("inf")), v)
            return out

        counts, w, c = timed(run_topo, args.repeat)
        print(f"| {method} | topo ({args.workers} octant threads) | {w:.2f} | {c:.2f} | counts {counts} |")
        for k, v in best.items():
            print(f"| {method} | topo: {k} (thread CPU, 8 octants) | | {v:.2f} | |")
        sd, w, c = timed(lambda: surface_dice(pb, gb, tau=SD_TOLERANCE), args.repeat)
        print(f"| {method} | surface_dice | {w:.2f} | {c:.2f} | {sd:.4f} |")
        v, w, c = timed(lambda: voi(pb, gb, alpha=VOI_ALPHA), args.repeat)
        print(f"| {method} | voi | {w:.2f} | {c:.2f} | {v.score:.4f} |")
        original = topo.topo_counts
        topo.topo_counts = lambda p, g, method=method, **kw: original(p, g, method=method, **kw)
        try:
            s, w, c = timed(lambda: score_volume(pred, labels), args.repeat)
            print(f"| {method} | score_volume | {w:.2f} | {c:.2f} | score {s.score:.4f} |", flush=True)
            gtc = GroundTruthCache()
            _, w, c = timed(lambda: score_volume(pred, labels, gt_cache=gtc), 1)
            print(f"| {method} | score_volume, first call with a GroundTruthCache (fills it) | {w:.2f} | {c:.2f} | |")
            s2, w, c = timed(lambda: score_volume(pred, labels, gt_cache=gtc), args.repeat)
            assert s2 == s, "the GT cache changed the score"
            print(f"| {method} | score_volume, GroundTruthCache filled | {w:.2f} | {c:.2f} | load {load:.1f} -> "
                  f"{os.getloadavg()[0]:.1f} |", flush=True)
        finally:
            topo.topo_counts = original
    _, w, c = timed(lambda: surface_dice(pb, gb, tau=SD_TOLERANCE, gt_prepared=gtc.surface), args.repeat)
    print(f"| | surface_dice, GT side prepared | {w:.2f} | {c:.2f} | |")
    _, w, c = timed(lambda: voi(pb, gb, alpha=VOI_ALPHA, gt_labels=gtc.voi_labels), args.repeat)
    print(f"| | voi, GT labels cached | {w:.2f} | {c:.2f} | |")
    forms = topo.gt_closed_forms(gb)
    _, w, c = timed(lambda: topo.topo_counts(pb, gb, workers=args.workers, gt_forms=forms), args.repeat)
    print(f"| fast | topo, GT closed forms cached | {w:.2f} | {c:.2f} | |", flush=True)


if __name__ == "__main__":
    main()
