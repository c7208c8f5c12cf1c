"""Time and peak memory of the local scorer per volume pair, by part.

Usage::

    PYTHONPATH=. python benchmarks/metric.py [--size 320] [--cases identical shift1 noisy allfg]

Each (case, part) runs in a fresh child process (so numba's JIT warm-up and earlier allocations
do not leak between measurements). The child builds a synthetic label volume (8 wavy 2-voxel sheets, a 3-voxel
ignore border), a prediction for the case, warms the JIT up on a small volume, then times each
part. Peak memory is the growth of the process's peak resident set size (``VmHWM``, reset before
each part through ``/proc/self/clear_refs``) above the resident size before the part, i.e. the
working memory the part needs beyond the two input volumes. If the official ``topometrics``
package is importable its ``compute_leaderboard_score`` is timed on the same pair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CASES = ("identical", "shift1", "noisy", "allfg")
PARTS = ("score_volume", "preprocess", "topo", "surface_dice", "voi", "official")


def make_pair(case: str, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(pred uint8, gt uint8)`` of shape ``(size,)*3`` for one benchmark case."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:size, :size, :size]
    gt = np.zeros((size, size, size), np.uint8)
    for k in range(8):
        base = (k + 0.5) * size / 8
        surf = base + 3 * np.sin(x / 17.0 + rng.uniform(0, 6)) + 2 * np.cos(y / 23.0 + rng.uniform(0, 6))
        gt[(z >= surf) & (z < surf + 2)] = 1
    gt[:3], gt[-3:], gt[:, :3], gt[:, -3:], gt[:, :, :3], gt[:, :, -3:] = 2, 2, 2, 2, 2, 2
    sheets = (gt == 1).astype(np.uint8)
    if case == "identical":
        pred = sheets
    elif case == "shift1":
        pred = np.roll(sheets, 1, axis=0)
    elif case == "noisy":
        pred = sheets.copy()
        pred[rng.random(gt.shape) < 0.0005] = 1
    elif case == "allfg":
        pred = np.ones_like(gt)
    else:
        raise ValueError(f"unknown case {case!r}, expected one of {CASES}")
    return pred, gt


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _run_part(part: str, pred: np.ndarray, gt: np.ndarray):
    from kaggle_utils.metrics import preprocess, score_volume, surface_dice, voi
    from kaggle_utils.metrics.topo import topo_counts

    if part == "score_volume":
        return score_volume(pred, gt).to_json()
    if part == "preprocess":
        return preprocess(pred, gt) and None
    if part == "official":
        from topometrics import compute_leaderboard_score

        return float(compute_leaderboard_score(predictions=pred, labels=gt, voi_alpha=0.3).score)
    pb, gb = preprocess(pred, gt)
    del pred, gt
    fn = {"topo": topo_counts, "surface_dice": surface_dice, "voi": voi}[part]
    return str(fn(pb, gb))


def child(case: str, part: str, size: int) -> dict:
    """Measure one part on one case in this (fresh) process."""
    if part == "official":
        try:
            import topometrics  # noqa: F401
        except ImportError:
            return {"case": case, "part": part, "missing": True}
    small_p, small_g = make_pair(case, 48)
    _run_part(part, small_p, small_g)  # JIT warm-up, lookup tables
    pred, gt = make_pair(case, size)
    fg = float((pred != 0).mean())
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    result = _run_part(part, pred, gt)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = max(0, _rss_kib("VmHWM") - before) / 1024
    return {"case": case, "part": part, "wall": wall, "cpu": cpu, "mib": peak, "fg_pred": fg, "result": result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--child", nargs=2, default=None, metavar=("CASE", "PART"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.size)))
        return 0

    res: dict[tuple[str, str], dict] = {}
    for case in args.cases:
        for part in args.parts:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", case, part, "--size", str(args.size)],
                capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            res[case, part] = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"{args.size}^3 pairs, one fresh process per cell: wall s / CPU s / MiB peak working memory "
          "(RSS growth above the two input volumes)")
    print(f"{'case':>10} | " + " | ".join(f"{p:^22}" for p in args.parts) + " | score")
    for case in args.cases:
        cells = []
        for part in args.parts:
            r = res[case, part]
            cells.append(f"{'not installed':^22}" if r.get("missing")
                         else f"{r['wall']:6.2f} {r['cpu']:6.2f} {r['mib']:6.0f}M")
        sv = res.get((case, "score_volume"))
        score = f"{sv['result']['score']:.4f}" if sv else "-"
        print(f"{case:>10} | " + " | ".join(cells) + f" | {score}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
