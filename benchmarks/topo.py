"""Benchmark ``kaggle_utils.metrics.topo.topo_counts`` on 320^3 pairs.

Cases: undulating 2-voxel-thick sheets (pred = GT shifted by one voxel in z + 0.05 % noise),
the same with holes punched into the prediction's sheets (forces the dimension-1 reductions),
random blobs (many tunnels: worst case for dimension 1), all foreground, empty.
Prints seconds per call (numba already compiled) and the process peak RSS.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/topo.py [--size 320]``
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from scipy import ndimage

from kaggle_utils.metrics.topo import topo_counts


def sheets(size: int, n_sheets: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = np.arange(size, dtype=np.float32)[:, None, None]
    y = np.arange(size, dtype=np.float32)[None, :, None]
    x = np.arange(size, dtype=np.float32)[None, None, :]
    out = np.zeros((size,) * 3, dtype=bool)
    for i in range(n_sheets):
        base = (i + 0.5) * size / n_sheets
        amp, fy, fx, ph = rng.uniform(3, 8), rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 6)
        surf = base + amp * np.sin(2 * np.pi * fy * y / size + ph) * np.cos(2 * np.pi * fx * x / size)
        out |= (z >= surf) & (z < surf + 2)
    return out


def blobs(size: int, seed: int = 0, frac: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.standard_normal((size,) * 3).astype(np.float32), 3)
    return f > np.quantile(f, 1 - frac)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--skip-blobs", action="store_true")
    args = ap.parse_args()
    n = args.size
    rng = np.random.default_rng(1)
    gt = sheets(n)
    pred = np.roll(gt, 1, axis=0) | (rng.random(gt.shape) < 0.0005)
    holed = pred.copy()
    for _ in range(20):  # square holes through the prediction's sheets -> tunnels (beta1 > 0)
        cy, cx = rng.integers(10, n - 10, size=2)
        holed[:, cy - 3:cy + 3, cx - 3:cx + 3] = False
    gt_holed = gt.copy()
    for _ in range(20):
        cy, cx = rng.integers(10, n - 10, size=2)
        gt_holed[:, cy - 3:cy + 3, cx - 3:cx + 3] = False
    cases = [
        ("sheets, shift 1 + 0.05% noise", pred, gt),
        ("sheets with holes in pred and GT", holed, gt_holed),
        ("all foreground vs sheets", np.ones_like(gt), gt),
        ("empty vs sheets", np.zeros_like(gt), gt),
    ]
    if not args.skip_blobs:
        b = blobs(n)
        bp = b ^ (rng.random(b.shape) < 0.01)
        cases.append(("random blobs 50% + 1% flips", bp, b))
    warm = blobs(24)  # compile / load the numba cache for every kernel
    topo_counts(warm, warm ^ (rng.random(warm.shape) < 0.05))
    print(f"inputs built, peak RSS {peak_rss_mb():.0f} MB")
    print(f"| case ({n}^3) | wall s | CPU s | peak RSS growth MB | counts {{k: (m,p,g)}} |")
    print("|---|---|---|---|---|")
    for name, p, g in cases:
        base = reset_peak()
        t, c0 = time.perf_counter(), time.process_time()
        c = topo_counts(p, g)
        dt, dc = time.perf_counter() - t, time.process_time() - c0
        grow = _status_mb("VmHWM") - base
        print(f"| {name} | {dt:.2f} | {dc:.2f} | {grow:.0f} | {c} |", flush=True)
    print(f"process peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
