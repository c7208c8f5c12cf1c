"""Benchmark ``kaggle_utils.metrics.topo.topo_counts`` on 320^3 pairs.

Cases: undulating 2-voxel-thick sheets (pred = GT shifted by one voxel in z + 0.05 % noise),
the same with holes punched into the prediction's sheets (forces the dimension-1 reductions),
a model-like prediction (GT shifted, dilated in places, blobs near the sheets, torn discs: see
:func:`model_like`), all foreground, empty, random blobs (many tunnels: worst case for dimension 1).
Prints the minimum seconds over ``--repeat`` calls (numba already compiled) and the process peak RSS.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/topo.py [--size 320] [--repeat 3] [--cases model] [--workers 1 2]
[--method fast|reference]``.
``--module path/to/topo.py`` times another copy of the module (e.g. ``git show HEAD~1:...`` saved to
/tmp) in the same session, for before/after comparisons. ``--score`` also times ``score_volume`` on
the model-like pair (3-voxel ignore border).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import resource
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from kaggle_utils.metrics import topo as topo_module


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


def wound_gt(size: int, n_sheets: int = 8, seed: int = 2) -> np.ndarray:
    """Ground truth like the competition's labels: wavy 2-voxel sheets with label gaps.

    ``sheets(size, n_sheets, seed)`` with ``60 * (size / 320)**2`` discs of radius 2-5 voxels
    removed (7 voxels deep in z, centred on a sheet voxel), so the GT has tunnels (beta1 > 0).

    Returns:
        ``bool (size, size, size)``.
    """
    gt = sheets(size, n_sheets=n_sheets, seed=seed)
    rng = np.random.default_rng(seed + 3)
    zz, yy, xx = np.nonzero(gt)
    g = np.ogrid[:size, :size]
    for _ in range(max(1, round(60 * (size / 320) ** 2))):
        i = rng.integers(len(zz))
        disc = (g[0] - yy[i]) ** 2 + (g[1] - xx[i]) ** 2 <= rng.uniform(2, 5) ** 2
        gt[max(zz[i] - 3, 0):zz[i] + 4] &= ~disc[None]
    return gt


def model_like(gt: np.ndarray, seed: int = 0, n_blobs: int = 200, n_tears: int = 40) -> np.ndarray:
    """A prediction that fails the way segmentation models do, deterministic in ``seed``.

    ``gt`` shifted by one voxel in z; dilated by one voxel where a smooth random field is high
    (about a third of the volume); ``n_blobs`` balls of radius 3-8 centred within 4 voxels of a sheet;
    ``n_tears`` discs (radius 3-10, 4 voxels thick in z) removed through the sheets.

    Args:
        gt: ``bool (Z, Y, X)`` ground-truth surface.

    Returns:
        ``bool (Z, Y, X)`` prediction.
    """
    rng = np.random.default_rng(seed)
    shape = gt.shape
    pred = np.roll(gt, 1, axis=0)
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 8)
    pred |= ndimage.binary_dilation(pred) & (field > np.quantile(field, 0.67))
    zz, yy, xx = np.nonzero(gt)
    for _ in range(n_blobs):
        i = rng.integers(len(zz))
        c = np.array([zz[i], yy[i], xx[i]]) + rng.integers(-4, 5, size=3)
        r = rng.uniform(3, 8)
        lo = np.maximum(c - int(np.ceil(r)), 0)
        hi = np.minimum(c + int(np.ceil(r)) + 1, shape)
        g = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d2 = sum((g[a] - c[a]) ** 2 for a in range(3))
        pred[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= d2 <= r * r
    for _ in range(n_tears):
        i = rng.integers(len(zz))
        c = np.array([zz[i], yy[i], xx[i]])
        r = rng.uniform(3, 10)
        lo = np.maximum(c - [2, int(r), int(r)], 0)
        hi = np.minimum(c + [2, int(r) + 1, int(r) + 1], shape)
        g = np.ogrid[lo[1]:hi[1], lo[2]:hi[2]]
        disc = (g[0] - c[1]) ** 2 + (g[1] - c[2]) ** 2 <= r * r
        pred[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] &= ~disc[None]
    return pred


def load_topo(path: str | None):
    """The topo module to time: this package's, or a copy of ``topo.py`` at ``path``."""
    if path is None:
        return topo_module
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # numba's cache re-imports the module by name
    spec.loader.exec_module(mod)
    return mod


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
    ap.add_argument("--repeat", type=int, default=1, help="calls per case; the minimum is reported")
    ap.add_argument("--cases", nargs="*", default=None, help="substrings of the case names to run")
    ap.add_argument("--module", default=None, help="path of another topo.py to time instead")
    ap.add_argument("--score", action="store_true", help="also time score_volume on the model-like pair")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="octant threads (one row per value)")
    ap.add_argument("--method", default=None, help="topo_counts method (fast / reference; default: the module's)")
    args = ap.parse_args()
    n = args.size
    topo_counts = load_topo(args.module).topo_counts
    if args.method is not None:
        topo_counts = functools.partial(topo_counts, method=args.method)
    topo_module.topo_counts = topo_counts  # score_volume looks it up at call time
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
    gt8 = wound_gt(n)
    cases = [
        ("sheets, shift 1 + 0.05% noise", pred, gt),
        ("sheets with holes in pred and GT", holed, gt_holed),
        ("model-like pred vs 8 sheets with gaps", model_like(gt8, seed=3), gt8),
        ("all foreground vs sheets", np.ones_like(gt), gt),
        ("empty vs sheets", np.zeros_like(gt), gt),
    ]
    if not args.skip_blobs:
        b = blobs(n)
        bp = b ^ (rng.random(b.shape) < 0.01)
        cases.append(("random blobs 50% + 1% flips", bp, b))
    if args.cases:
        cases = [c for c in cases if any(w in c[0] for w in args.cases)]
    warm = blobs(24)  # compile / load the numba cache for every kernel
    topo_counts(warm, warm ^ (rng.random(warm.shape) < 0.05))
    print(f"inputs built, peak RSS {peak_rss_mb():.0f} MB")
    print(f"| case ({n}^3) | octant threads | wall s | CPU s | peak RSS growth MB | counts {{k: (m,p,g)}} |")
    print("|---|---|---|---|---|---|")
    for name, p, g in cases:
        for workers in args.workers:
            best = (float("inf"), 0.0)
            for _ in range(max(args.repeat, 1)):
                base = reset_peak()
                t, c0 = time.perf_counter(), time.process_time()
                c = topo_counts(p, g, workers=workers)
                best = min(best, (time.perf_counter() - t, time.process_time() - c0))
                grow = _status_mb("VmHWM") - base
            print(f"| {name} | {workers} | {best[0]:.2f} | {best[1]:.2f} | {grow:.0f} | {c} |", flush=True)
    if args.score:
        from kaggle_utils.metrics import score_volume

        labels = gt8.astype(np.uint8)
        for ax in range(3):
            idx = [slice(None)] * 3
            idx[ax] = np.r_[0:3, n - 3:n]
            labels[tuple(idx)] = 2
        mp = model_like(gt8, seed=3).astype(np.uint8)
        score_volume(mp[:32, :32, :32], labels[:32, :32, :32])
        best = (float("inf"), 0.0)
        for _ in range(max(args.repeat, 1)):
            t, c0 = time.perf_counter(), time.process_time()
            res = score_volume(mp, labels)
            best = min(best, (time.perf_counter() - t, time.process_time() - c0))
        print(f"score_volume model-like: wall {best[0]:.2f} s, CPU {best[1]:.2f} s, "
              f"score {res.score:.4f}, counts {res.topo_counts}", flush=True)
    print(f"process peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
