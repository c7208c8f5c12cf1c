"""How hard is the synthetic stand-in for trivial baselines? (Exact local competition metric.)

Generates ``--n`` volumes (alternating 96^3 and 128^3 by default) from ``--n-scrolls`` scroll
styles with :func:`kaggle_utils.synthetic.make_volume` and scores, with
:func:`kaggle_utils.metrics.score_volume`:

- ``ideal``: the label itself (``label == 1``), must be 1.0;
- ``dilated-1``: the label dilated by one voxel (6-neighbourhood): an almost perfect model that
  predicts sheets a bit too thick;
- ``otsu``: :func:`kaggle_utils.baselines.baseline_prediction` (Otsu threshold of the volume);
- ``thr+dust (tuned)``: one global intensity-percentile threshold followed by
  :func:`kaggle_utils.postprocess.remove_small_components`, with the (percentile, min size) pair
  chosen on the same volumes for the best mean score (an optimistic, fitted-on-test baseline);
- ``thr+dust (oracle)``: the best pair per volume (an upper bound of any global threshold rule).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/synthetic_baselines.py [--n 12]``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from scipy import ndimage

from kaggle_utils.baselines import baseline_prediction
from kaggle_utils.metrics import score_volume
from kaggle_utils.postprocess import remove_small_components
from kaggle_utils.synthetic import SCROLL_IDS, make_volume, scroll_style

PERCENTILES = (72.0, 76.0, 80.0, 84.0, 87.0, 90.0, 93.0, 96.0)
MIN_SIZES = (100, 1000)


def _row(name: str, scores: list) -> str:
    a = np.array([[s.score, s.topo_score, s.surface_dice, s.voi_score] for s in scores])
    m = a.mean(axis=0)
    return f"| {name} | {m[0]:.3f} | {a[:, 0].min():.3f}–{a[:, 0].max():.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12, help="number of volumes")
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128], help="edge lengths, cycled")
    ap.add_argument("--n-scrolls", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    vols, gen_s = [], []
    for i in range(args.n):
        sid = SCROLL_IDS[i % args.n_scrolls]
        size = args.sizes[i % len(args.sizes)]
        t = time.perf_counter()
        image, label = make_volume((size,) * 3, seed=1000 * args.seed + i, style=scroll_style(sid, args.seed))
        gen_s.append((size, time.perf_counter() - t))
        vols.append((sid, image, label))

    results: dict[str, list] = {"ideal": [], "dilated-1": [], "otsu": []}
    grid = list(itertools.product(PERCENTILES, MIN_SIZES))
    grid_scores = np.zeros((args.n, len(grid)))
    grid_objs: list[list] = []
    for i, (sid, image, label) in enumerate(vols):
        sheet = label == 1
        results["ideal"].append(score_volume(sheet, label))
        results["dilated-1"].append(score_volume(ndimage.binary_dilation(sheet), label))
        results["otsu"].append(score_volume(baseline_prediction(image, "otsu"), label))
        objs = []
        for j, (pct, min_size) in enumerate(grid):
            mask = image > np.percentile(image, pct)
            s = score_volume(remove_small_components(mask, min_size), label)
            grid_scores[i, j] = s.score
            objs.append(s)
        grid_objs.append(objs)
    best = int(np.argmax(grid_scores.mean(axis=0)))
    results[f"thr+dust tuned (p{grid[best][0]:g}, min {grid[best][1]})"] = [o[best] for o in grid_objs]
    results["thr+dust oracle (best per volume)"] = [o[int(np.argmax(grid_scores[i]))] for i, o in enumerate(grid_objs)]

    print(f"{args.n} volumes, sizes {args.sizes}, scrolls {list(SCROLL_IDS[: args.n_scrolls])}, seed {args.seed}")
    print("| prediction | mean score | min–max | TopoScore | SurfaceDice | VOI_score |")
    print("|---|---|---|---|---|---|")
    for name, scores in results.items():
        print(_row(name, scores))
    for size in sorted(set(args.sizes)):
        t = [s for n, s in gen_s if n == size]
        print(f"make_volume {size}^3: mean {np.mean(t):.2f} s, max {np.max(t):.2f} s")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
