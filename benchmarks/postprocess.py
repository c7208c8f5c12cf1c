"""Effect of each post-processing step on the local competition score (synthetic data).

Ground truth: ``kaggle_utils.synthetic.make_volume`` (wound papyrus sheets, ignore label 2).
Probability map, built to show the errors a real network makes (``noisy_probability``):
the true surface blurred (sigma 1, so predictions come out ~2 voxels too thick), small holes
punched into the sheets, speckle false positives, and smooth logit noise.

For each volume, each configuration of :class:`kaggle_utils.postprocess.PostprocessConfig` is
applied and scored with ``kaggle_utils.metrics.score_volume``; the table prints the mean score
and its terms, cumulative (each row adds one step) and each step alone on top of the threshold.

Run: ``PYTHONPATH=. python benchmarks/postprocess.py [--n 6] [--size 128] [--seed 0]``
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from scipy import ndimage

from kaggle_utils.metrics import score_volume
from kaggle_utils.postprocess import PostprocessConfig, postprocess
from kaggle_utils.synthetic import make_volume


def noisy_probability(label: np.ndarray, seed: int) -> np.ndarray:
    """``float32 (Z, Y, X)`` probabilities imitating a network's output for ``label``."""
    rng = np.random.default_rng(seed)
    sheet = (label == 1).astype(np.float32)
    # holes: knock out ~1-2 voxel patches of the sheet
    holes = ndimage.binary_dilation(rng.random(label.shape) < 0.002, iterations=1)
    sheet[holes] = 0.0
    signal = ndimage.gaussian_filter(sheet, 1.0)
    signal /= max(float(signal.max()), 1e-6)
    # speckle: small bright blobs away from the surface
    speckle = ndimage.gaussian_filter((rng.random(label.shape) < 0.0008).astype(np.float32), 0.8)
    speckle /= max(float(speckle.max()), 1e-6)
    noise = ndimage.gaussian_filter(rng.standard_normal(label.shape).astype(np.float32), 1.0)
    noise /= max(float(noise.std()), 1e-6)
    logit = 9.0 * (signal - 0.3) + 7.0 * speckle + 1.0 * noise
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def configs() -> tuple[list[tuple[str, PostprocessConfig]], list[tuple[str, PostprocessConfig]]]:
    base = PostprocessConfig(threshold=0.5)
    dust = replace(base, min_component_size=200)
    holes = replace(dust, fill_holes=True, max_cavity_size=50)
    closing = replace(holes, closing_radius=1)
    hyst = replace(closing, hysteresis_low=0.5, hysteresis_high=0.9)
    cumulative = [
        ("threshold 0.5", base),
        ("+ dust (<200 vox)", dust),
        ("+ holes (pinholes, cavities<=50)", holes),
        ("+ closing (r=1)", closing),
        ("+ hysteresis (0.5/0.9)", hyst),
    ]
    alone = [
        ("dust alone", replace(base, min_component_size=200)),
        ("holes alone", replace(base, fill_holes=True, max_cavity_size=50)),
        ("closing alone", replace(base, closing_radius=1)),
        ("dust <1000 alone", replace(base, min_component_size=1000)),
        ("hysteresis 0.5/0.9 alone", replace(base, hysteresis_low=0.5, hysteresis_high=0.9)),
        ("hysteresis 0.3/0.7 alone", replace(base, hysteresis_low=0.3, hysteresis_high=0.7)),
        ("threshold 0.6", replace(base, threshold=0.6)),
        ("threshold 0.7", replace(base, threshold=0.7)),
    ]
    return cumulative, alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="number of synthetic volumes")
    ap.add_argument("--size", type=int, default=128, help="edge length of the cubic volumes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cumulative, alone = configs()
    rows = cumulative + alone
    scores: dict[str, list] = {name: [] for name, _ in rows}
    seconds: dict[str, float] = {name: 0.0 for name, _ in rows}
    fg: dict[str, list] = {name: [] for name, _ in rows}
    truth: list[float] = []
    for i in range(args.n):
        _, label = make_volume((args.size,) * 3, seed=args.seed + i)
        prob = noisy_probability(label, seed=1000 + args.seed + i)
        truth.append(float((label == 1).mean()))
        for name, cfg in rows:
            t = time.perf_counter()
            mask = postprocess(prob, cfg)
            seconds[name] += time.perf_counter() - t
            fg[name].append(float(mask.mean()))
            scores[name].append(score_volume(mask, label))

    print(f"{args.n} synthetic volumes of {args.size}^3, seed {args.seed}; mean over volumes; "
          f"label==1 share {100 * np.mean(truth):.2f}%")
    print(f"{'configuration':36} {'score':>7} {'topo':>7} {'SD':>7} {'VOI_sc':>7} {'fg%':>6} {'pp s/vol':>8}")
    for block, title in ((cumulative, "cumulative"), (alone, "each step alone on threshold 0.5")):
        print(f"-- {title}")
        for name, _ in block:
            s = scores[name]
            print(f"{name:36} {np.mean([v.score for v in s]):7.4f} {np.mean([v.topo_score for v in s]):7.4f} "
                  f"{np.mean([v.surface_dice for v in s]):7.4f} {np.mean([v.voi_score for v in s]):7.4f} "
                  f"{100 * np.mean(fg[name]):6.2f} {seconds[name] / args.n:8.3f}")


if __name__ == "__main__":
    main()
