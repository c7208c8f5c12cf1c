"""What a post-processing search costs on real-size out-of-fold probabilities, lever by lever.

Input: out-of-fold probabilities written by the training command (``train --fold -1`` on a synthetic
320^3 set, see BENCHMARKS.md "Tuning at real scale") and the labels of that set. The script

1. times one ``score_volume`` call on a real pair (threshold 0.5 of the first volume's probabilities),
2. worker scaling: a small exhaustive search (``--thresholds`` + ``--n-random`` random candidates of
   the default space on ``--scaling-volumes`` volumes) in ``--workers`` processes and in one,
3. exhaustive against successive halving with the upper-bound rejection off and on, on one pool of
   ``--halving-pool`` candidates and ``--halving-volumes`` volumes (their winners side by side),
4. the octant cache off / on for the default coordinate-descent search on ``--coordinate-volumes``
   volumes (it changes one field at a time, so octants repeat),
5. projects the measured seconds per (candidate, volume) pair to the issue's search: 100 candidates
   x 20 volumes, exhaustive and successive halving (``halving_schedule``), on 2 and 4 worker processes.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/tune_real.py --probs RUN --data-dir DATA`` (defaults: the table of
BENCHMARKS.md "Tuning at real scale"; about 45 min on 2 cores at 320^3).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaggle_utils.metrics import score_volume  # noqa: E402
from kaggle_utils.postprocess import PostprocessConfig, postprocess  # noqa: E402
from kaggle_utils.tune import SearchSpace, halving_schedule, load_labels, load_probs, tune  # noqa: E402


def _rss_mib() -> tuple[float, float]:
    """Peak RSS of this process and of the largest finished child, MiB (Linux: ru_maxrss in KiB)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids


def _spread(probs, n: int) -> list[int]:
    """``n`` volume indices alternating over folds (the first volumes of each fold)."""
    by_fold: dict = {}
    for i, p in enumerate(probs):
        by_fold.setdefault(p.fold, []).append(i)
    order = [i for group in zip(*by_fold.values()) for i in group]
    return sorted(order[:n])


def _search(probs, labels, space: SearchSpace, workers: int, cache: bool, name: str) -> dict:
    cpu0 = time.process_time()
    res = tune(probs, labels, space, workers=workers, progress=False, octant_cache=cache, curve=False)
    tm, c = res.timings, res.cache
    busy = tm["postprocess"] + tm["score"]
    me, kids = _rss_mib()
    octs = c["octants_reused"] + c["octants_scored"]
    row = dict(name=name, workers=workers, cache=cache, pairs=res.n_tasks, wall=tm["wall"], pp=tm["postprocess"],
               score=tm["score"], per_pair=busy / max(res.n_tasks, 1), masks=c["masks_reused"],
               oct=f"{c['octants_reused']}/{octs}", best=res.best_score, cfg=res.best,
               main_cpu=time.process_time() - cpu0, rss=me, rss_child=kids, bounded=c.get("pairs_bounded", 0))
    print(f"| {name} | {workers} | {'on' if cache else 'off'} | {row['pairs']} | {row['wall']:.1f} | {row['pp']:.1f} | "
          f"{row['score']:.1f} | {row['per_pair']:.2f} | {row['masks']} | {row['oct']} | {me:.0f} / {kids:.0f} | "
          f"{row['best']:.4f} |", flush=True)
    return row


HEADER = ("| search | workers | octant cache | pairs scored | wall s | worker pp s | worker score s | s per pair | "
          "identical masks | octants reused | peak RSS MiB main / largest worker | best |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _subset(probs, labels, n: int):
    sel = _spread(probs, n)
    return [probs[i] for i in sel], [labels[i] for i in sel]


def _one_call(probs, labels) -> None:
    """Seconds of one ``score_volume`` on a real pair (threshold 0.5 of the first volume)."""
    prob0 = np.asarray(probs[0].prob, dtype=np.float32)
    mask = postprocess(prob0, PostprocessConfig(threshold=0.5))
    c0, w0 = time.process_time(), time.perf_counter()
    s = score_volume(mask, labels[0])
    print(f"score_volume on {probs[0].id} {prob0.shape} (threshold 0.5, fg {100 * mask.mean():.2f}%): "
          f"{time.perf_counter() - w0:.2f} s wall, {time.process_time() - c0:.2f} s CPU; score {s.score:.4f} "
          f"(topo {s.topo_score:.4f} {s.topo_counts}, SD {s.surface_dice:.4f}, VOI {s.voi_score:.4f})", flush=True)


def _projection(per_pair: float, workers: int, halving_ratio: float | None) -> None:
    """Minutes of the issue's 100 x 20 search from measured worker seconds per pair."""
    rungs = halving_schedule(100, 20)
    # survivors keep their scores of earlier rungs: each rung adds (its candidates) x (its new volumes)
    n_half = rungs[0][0] * rungs[0][1] + sum(c * (v - pv) for (c, v), (_, pv) in zip(rungs[1:], rungs[:-1]))
    print(f"\nprojection from {per_pair:.2f} worker s per pair ({workers} workers measured): halving rungs {rungs} = "
          f"{n_half} pairs (+ 9 x 20 for the threshold curve of --plot)")
    print("| search | pairs | 2 workers (measured rate) | 4 workers (x2, linear) |")
    print("|---|---|---|---|")
    plans = [("exhaustive 100 x 20", 2000, 1.0), ("halving 100 x 20, bounds off", n_half, 1.0),
             ("the same + threshold curve (--plot)", n_half + 180, 1.0)]
    if halving_ratio is not None:
        plans.append((f"halving, bounds on (x{halving_ratio:.2f}, the measured wall ratio)", n_half, halving_ratio))
    for name, pairs, factor in plans:
        two = pairs * per_pair / 2 * factor
        print(f"| {name} | {pairs} | {two / 60:.0f} min | {two / 2 / 60:.0f} min |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probs", type=Path, required=True, help="run folder of train --fold -1 (fold*/oof)")
    ap.add_argument("--data-dir", type=Path, required=True, help="the labels (competition layout)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scaling-volumes", type=int, default=2, help="volumes of the 1-vs-N-workers search (0: skip)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--n-random", type=int, default=8)
    ap.add_argument("--halving-pool", type=int, default=20, help="pool of the exhaustive / halving comparison (0: skip)")
    ap.add_argument("--halving-volumes", type=int, default=6)
    ap.add_argument("--coordinate-volumes", type=int, default=1, help="octant cache off/on (0: skip)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    probs = load_probs(args.probs)
    labels = load_labels(args.data_dir, [p.id for p in probs])
    shapes = sorted({tuple(p.prob.shape) for p in probs})
    print(f"{len(probs)} out-of-fold volumes {shapes} from {args.probs}, folds {sorted({str(p.fold) for p in probs})}; "
          f"loaded with labels in {time.perf_counter() - t0:.1f} s")
    _one_call(probs, labels)
    print("\n" + HEADER)
    per_pair, ratio = None, None
    if args.scaling_volumes:  # the same small exhaustive search in N workers and in one
        sub, lab = _subset(probs, labels, args.scaling_volumes)
        space = SearchSpace(threshold=list(args.thresholds), method="exhaustive", n_random=args.n_random)
        par = _search(sub, lab, space, args.workers, True, f"exhaustive, {len(sub)} vol")
        one = _search(sub, lab, space, 1, True, f"exhaustive, {len(sub)} vol")
        per_pair = par["per_pair"]
        print(f"worker scaling: 1 worker {one['wall']:.1f} s wall, {args.workers} workers {par['wall']:.1f} s "
              f"(speed-up {one['wall'] / par['wall']:.2f}x)")
    if args.halving_pool:  # exhaustive vs halving (bounds off / on) on the same pool
        sub, lab = _subset(probs, labels, args.halving_volumes)
        n_random = max(1, args.halving_pool - len(SearchSpace().threshold))
        full = _search(sub, lab, SearchSpace(method="exhaustive", n_random=n_random), args.workers, True,
                       f"exhaustive, {len(sub)} vol")
        plain = _search(sub, lab, SearchSpace(method="halving", n_random=n_random, halving_bounds=False),
                        args.workers, True, "halving, bounds off")
        fast = _search(sub, lab, SearchSpace(method="halving", n_random=n_random, halving_bounds=True),
                       args.workers, True, "halving, bounds on")
        ratio = fast["wall"] / plain["wall"]
        per_pair = per_pair or full["per_pair"]
        print(f"pool {args.halving_pool}, rungs {halving_schedule(args.halving_pool, len(sub))}: halving picks the "
              f"exhaustive winner: {'yes' if plain['cfg'] == full['cfg'] else 'no'} ({plain['best']:.4f} vs "
              f"{full['best']:.4f}); bounds on picks the same as off: {'yes' if plain['cfg'] == fast['cfg'] else 'NO'}; "
              f"pairs scored in full {plain['pairs']} -> {fast['pairs']} (+{fast['bounded']} bounded)")
    if args.coordinate_volumes:  # the default search changes one field at a time: octants repeat
        sub, lab = _subset(probs, labels, args.coordinate_volumes)
        off = _search(sub, lab, SearchSpace(), args.workers, False, f"coordinate, {len(sub)} vol")
        on = _search(sub, lab, SearchSpace(), args.workers, True, f"coordinate, {len(sub)} vol")
        print(f"octant cache on the default coordinate search: wall {off['wall']:.1f} -> {on['wall']:.1f} s, worker "
              f"scoring {off['score']:.1f} -> {on['score']:.1f} s")
    if per_pair is not None:
        _projection(per_pair, args.workers, ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
