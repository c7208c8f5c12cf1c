"""Effect and cost of each post-processing step, on out-of-fold probabilities of a real training run.

Two parts:

* ``--probs RUN/fold0/oof --data-dir DATA``: out-of-fold probabilities written by
  ``python -m kaggle_utils train`` (``{id}.npy`` + ``{id}.json``) and their labels. Rows: the best
  plain threshold (threshold-only), each step alone on top of it, and the chain that
  :func:`kaggle_utils.tune.tune` chooses from :data:`kaggle_utils.tune.WINNERS_SPACE` (in-sample, on
  the same volumes; with two or more folds, the fold guard's held-out scores and the held-out gain
  over the plain threshold, both chosen on the other folds, are printed after it). Scores are
  ``kaggle_utils.metrics.score_volume`` means (score, TopoScore, SurfaceDice, VOI_score).
* ``--timing-size 320``: seconds per step on one synthetic ``320^3`` probability volume
  (``noisy_probability`` of a ``synthetic.make_volume`` label: blurred surface, punched holes,
  speckle, smooth noise), each step alone after the threshold, and the whole chain.

Run (after ``make .venv/.installed``)::

    python -m kaggle_utils synth --out /tmp/ppb/data --n-train 12 --n-test 0 --size 96 --n-scrolls 4 --seed 0
    python -m kaggle_utils train --config demo-cpu --fold 0 --data-dir /tmp/ppb/data --out /tmp/ppb/run
    PYTHONPATH=. python benchmarks/postprocess.py --probs /tmp/ppb/run/oof --data-dir /tmp/ppb/data --timing-size 320
    # held-out gain: a second fold's OOF probabilities beside the first (load_probs reads sub-folders)
    python -m kaggle_utils train --config demo-cpu --fold 1 --epochs 4 --data-dir /tmp/ppb/data --out /tmp/ppb/run1
    mkdir -p /tmp/oof2/f0 /tmp/oof2/f1 && cp /tmp/ppb/run/oof/* /tmp/oof2/f0 && cp /tmp/ppb/run1/oof/* /tmp/oof2/f1
    PYTHONPATH=. python benchmarks/postprocess.py --probs /tmp/oof2 --data-dir /tmp/ppb/data --workers 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from scipy import ndimage

from kaggle_utils.metrics import score_volume
from kaggle_utils.postprocess import PostprocessConfig, postprocess


def noisy_probability(label: np.ndarray, seed: int) -> np.ndarray:
    """``float32 (Z, Y, X)`` probabilities imitating a network's output for ``label`` (timing only)."""
    rng = np.random.default_rng(seed)
    sheet = (label == 1).astype(np.float32)
    holes = ndimage.binary_dilation(rng.random(label.shape) < 0.002, iterations=1)
    sheet[holes] = 0.0
    signal = ndimage.gaussian_filter(sheet, 1.0)
    signal /= max(float(signal.max()), 1e-6)
    speckle = ndimage.gaussian_filter((rng.random(label.shape) < 0.0008).astype(np.float32), 0.8)
    speckle /= max(float(speckle.max()), 1e-6)
    noise = ndimage.gaussian_filter(rng.standard_normal(label.shape).astype(np.float32), 1.0)
    noise /= max(float(noise.std()), 1e-6)
    logit = 9.0 * (signal - 0.3) + 7.0 * speckle + 1.0 * noise
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def steps(base: PostprocessConfig) -> list[tuple[str, PostprocessConfig]]:
    """Each step alone on top of ``base`` (the threshold-only config)."""
    return [
        ("dust <1000 (existing)", replace(base, min_component_size=1000)),
        ("border 3 (existing)", replace(base, border=3)),
        ("sheets: close 3, holes <=4096 (1st)", replace(base, sheets=True)),
        ("sheets: close 1, holes <=256 (1st)", replace(base, sheets=True, sheet_closing=1, sheet_max_hole=256)),
        ("2x2x2 hole plug (1st)", replace(base, hole_plug=True)),
        ("z-prune (3rd)", replace(base, z_prune=True)),
        ("closing z r=1 (2nd/12th)", replace(base, closing_z=1)),
        ("closing z r=2", replace(base, closing_z=2)),
        ("closing xy r=1 (12th)", replace(base, closing_xy=1)),
        ("opening r=1 (12th)", replace(base, opening_radius=1)),
        ("ridge sigma 1 (3rd)", replace(base, ridge_sigma=1.0)),
        ("ridge sigma 1.5", replace(base, ridge_sigma=1.5)),
        ("skeleton r=1.5 (9th)", replace(base, skeleton_radius=1.5)),
        (f"skeleton r=1.5 of prob>{max(base.threshold - 0.2, 0.05):g}",
         replace(base, skeleton_radius=1.5, skeleton_threshold=round(max(base.threshold - 0.2, 0.05), 6))),
        ("split 0.6/0.7/0.8 (2nd)", replace(base, split_levels=(0.6, 0.7, 0.8))),
    ]


def _row(name: str, scores: list, fg: list[float], secs: float | None = None) -> str:
    m = lambda k: np.mean([getattr(v, k) for v in scores])  # noqa: E731
    t = " |" if secs is None else f" {secs:.3f} |"
    return (f"| {name} | {m('score'):.4f} | {m('topo_score'):.4f} | {m('surface_dice'):.4f} | {m('voi_score'):.4f} | "
            f"{100 * np.mean(fg):.2f} |{t}")


def oof_table(probs_dir: str, data_dir: str, workers: int, rounds: int) -> None:
    from kaggle_utils.tune import WINNERS_SPACE, load_labels, load_probs, load_search_space, tune

    probs = load_probs(probs_dir)
    labels = load_labels(data_dir, [p.id for p in probs])
    vols = [np.asarray(p.prob, dtype=np.float32) for p in probs]
    shapes = sorted({v.shape for v in vols})
    print(f"{len(vols)} OOF volumes {shapes} from {probs_dir}; label==1 share "
          f"{100 * np.mean([(lab == 1).mean() for lab in labels]):.2f}%, labelled share "
          f"{100 * np.mean([(lab != 2).mean() for lab in labels]):.2f}%")

    def run(cfg: PostprocessConfig):
        t0 = time.perf_counter()
        masks = [postprocess(v, cfg) for v in vols]
        secs = (time.perf_counter() - t0) / len(vols)
        return [score_volume(m, lab) for m, lab in zip(masks, labels)], [float(m.mean()) for m in masks], secs

    # threshold-only: the best plain threshold on these volumes
    grid = {}
    for t in np.round(np.arange(0.2, 0.85, 0.05), 2):
        s, fg, _ = run(PostprocessConfig(threshold=float(t)))
        grid[float(t)] = (np.mean([v.score for v in s]), s, fg)
    best_t = max(grid, key=lambda t: grid[t][0])
    print("threshold curve: " + ", ".join(f"{t:g}: {grid[t][0]:.4f}" for t in grid))
    base = PostprocessConfig(threshold=best_t)
    print("| configuration | score | topo | SD | VOI_sc | fg % | pp s/vol |")
    print("|---|---|---|---|---|---|---|")
    s0, fg0 = grid[0.5][1], grid[0.5][2]
    print(_row("threshold 0.5", s0, fg0))
    print(_row(f"threshold-only (best, {best_t:g})", grid[best_t][1], grid[best_t][2]))
    for name, cfg in steps(base):
        s, fg, secs = run(cfg)
        print(_row(name, s, fg, secs))

    space = load_search_space(data=dict(WINNERS_SPACE, threshold=[round(float(t), 2) for t in
                                                                  np.arange(0.3, 0.85, 0.1)], rounds=rounds))
    t0 = time.perf_counter()
    res = tune(probs, labels, space, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    s, fg, secs = run(res.best)
    print(_row("tuned chain (WINNERS_SPACE)", s, fg, secs))

    print(f"tuned: {res.best.summary()}; {len(res.candidates)} candidates, {wall:.0f} s wall, {workers} workers")
    if res.fold_guard:
        print(res.format_table().split("fold guard", 1)[-1])
        held_out_gain(res)


def held_out_gain(res) -> None:
    """Per fold: the tuned chain and the plain threshold, each chosen on the other folds, scored on this one."""
    plain = [j for j, c in enumerate(res.candidates) if c.stage == "grid" and not c.cfg.uses_hysteresis]
    folds = np.array([str(f) for f in res.folds])
    print("| held-out fold | n | plain threshold (chosen on the others) | tuned chain (chosen on the others) | gain |")
    print("|---|---|---|---|---|")
    gains, ns = [], []
    for g in res.fold_guard:
        held = folds == str(g.fold)
        other = res.scores[:, ~held, 0].mean(axis=1)
        jp = plain[int(np.argmax(other[plain]))]
        p_score = float(res.scores[jp, held, 0].mean())
        gains.append(g.held_out_score - p_score)
        ns.append(int(held.sum()))
        print(f"| {g.fold} | {ns[-1]} | {p_score:.4f} (thr {res.candidates[jp].cfg.threshold:g}) | "
              f"{g.held_out_score:.4f} ({g.chosen.summary()}) | {gains[-1]:+.4f} |")
    print(f"held-out gain of the tuned chain over the best plain threshold, volume-weighted: "
          f"{np.average(gains, weights=ns):+.4f}")


def timing(size: int, seed: int) -> None:
    from kaggle_utils.synthetic import make_volume

    _, label = make_volume((size,) * 3, seed=seed)
    prob = noisy_probability(label, seed=1000 + seed)
    base = PostprocessConfig(threshold=0.5, min_component_size=1000, border=3)
    t0 = time.perf_counter()
    postprocess(prob, base)
    t_base = time.perf_counter() - t0
    print(f"one {size}^3 volume, seed {seed}: base (threshold 0.5, border 3, dust <1000) {t_base:.2f} s; "
          f"each row: the step added to base, seconds of the step (total minus base)")
    print("| step | s (step) | fg % |")
    print("|---|---|---|")
    chain = replace(base, sheets=True, hole_plug=True, z_prune=True, closing_z=1, closing_xy=1, opening_radius=1,
                    ridge_sigma=1.0, skeleton_radius=1.5, split_levels=(0.6, 0.7, 0.8))
    for name, cfg in steps(base)[2:] + [("all steps together", chain)]:
        t0 = time.perf_counter()
        out = postprocess(prob, cfg)
        dt = time.perf_counter() - t0
        print(f"| {name} | {dt - t_base if name != 'all steps together' else dt:.2f} | {100 * out.mean():.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probs", help="OOF probability folder (RUN/fold0/oof or RUN/oof)")
    ap.add_argument("--data-dir", help="competition-layout folder with train_labels/")
    ap.add_argument("--workers", type=int, default=2, help="tune worker processes")
    ap.add_argument("--rounds", type=int, default=1, help="coordinate-descent rounds of the tuned chain")
    ap.add_argument("--timing-size", type=int, default=0, help="also time each step on one synthetic S^3 volume")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.probs:
        if not args.data_dir:
            ap.error("--probs needs --data-dir")
        oof_table(args.probs, args.data_dir, args.workers, args.rounds)
    if args.timing_size:
        timing(args.timing_size, args.seed)


if __name__ == "__main__":
    main()
