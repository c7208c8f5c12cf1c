"""Benchmark the training patch sampler (kaggle_utils.sampling).

Prints: the cold-read cost of a 320^3 LZW TIFF, where the time of one patch goes (single thread,
warm cache), and DataLoader throughput in 128^3 patches/s with 0 and 2 workers, with and without
augmentation. The last line is ``patches/s (128^3, augmented, 2 workers): N``.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/sampler.py [--data-dir DIR] [--n-volumes 6]``
(the synthetic 320^3 set is generated once into ``--data-dir`` and reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from kaggle_utils.data import load_index, normalize_intensity, read_label, read_volume, write_volume
from kaggle_utils.augment import AugmentConfig, augment_batch
from kaggle_utils.sampling import (
    PatchDataset,
    SamplerConfig,
    VolumeCache,
    _crop_slices,
    make_loader,
)


def _simple_volume(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fallback generator: noisy parallel sheets, ignore slab and border."""
    rng = np.random.default_rng(seed)
    z = np.arange(size)[:, None, None]
    y = np.arange(size)[None, :, None]
    sheet = (np.abs(((z + 0.1 * y + seed) % 12) - 6) < 1).repeat(size, 2)
    label = sheet.astype(np.uint8)
    label[:, : size // 2] = 2
    label[:3], label[-3:], label[:, :, :3], label[:, :, -3:] = 2, 2, 2, 2
    image = np.clip(60 + 100 * sheet + rng.normal(0, 8, sheet.shape), 0, 255).astype(np.uint8)
    return image, label


def make_data(root: Path, n: int, size: int) -> Path:
    if (root / "train.csv").exists():
        return root
    try:
        from kaggle_utils.synthetic import generate_dataset

        return generate_dataset(root, n_train=n, n_test=0, size=size, n_scrolls=min(n, 3), seed=0)
    except ImportError:
        (root / "train_images").mkdir(parents=True, exist_ok=True)
        (root / "train_labels").mkdir(exist_ok=True)
        rows = ["id,scroll_id"]
        for i in range(n):
            image, label = _simple_volume(size, i)
            write_volume(root / "train_images" / f"{i}.tif", image)
            write_volume(root / "train_labels" / f"{i}.tif", label)
            rows.append(f"{i},{i % 3}")
        (root / "train.csv").write_text("\n".join(rows) + "\n")
        return root


def _time(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000.0


def breakdown(ds: PatchDataset, aug: AugmentConfig, n: int = 10) -> list[tuple[str, float, float]]:
    """(step, ms when applied, expected ms per patch) on one thread with a warm cache."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rec = ds.records[0]
    vol = ds.cache.get(rec)
    size = ds.cfg.patch_size
    origin = ds._pick_origin(vol, rng)[0]
    src, _, _ = _crop_slices(vol.image.shape, origin, size)
    rows = [
        ("pick origin (surface/uniform + ignore check)", _time(lambda: ds._pick_origin(vol, rng), n), None),
        ("crop image (uint8)", _time(lambda: np.ascontiguousarray(vol.image[src]), n), None),
        ("normalize crop (zscore, whole-volume stats)",
         _time(lambda: normalize_intensity(vol.image[src], vol.stats, ds.cfg.normalization), n), None),
        ("crop label", _time(lambda: np.array(vol.label[src]), n), None),
    ]
    rows = [(a, b, b) for a, b, _ in rows]
    image, label = ds._cut(vol, origin)
    img = torch.from_numpy(image)[None, None]
    lbl = torch.from_numpy(label)[None, None]
    off = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")}
    names = {"p_flip": "flips (3 axes)", "p_rot90": "rot90 (3 planes)", "p_affine": "small rotation+zoom (grid_sample)",
             "p_intensity": "intensity scale/shift", "p_gamma": "gamma", "p_noise": "gaussian noise",
             "p_blur": "gaussian blur"}
    for key, name in names.items():
        cfg = dataclasses.replace(aug, **{**off, key: 1.0})
        gen = torch.Generator().manual_seed(0)
        ms = _time(lambda: augment_batch(img, lbl, cfg, gen)[0].contiguous(), n)
        p = getattr(aug, key)
        if key in ("p_flip", "p_rot90"):  # drawn per axis/plane: applied at least once with 1-(1-p)^3
            p = 1 - (1 - p) ** 3
        rows.append((f"aug: {name} (p={getattr(aug, key)})", ms, ms * p))
    gen = torch.Generator().manual_seed(0)
    ms = _time(lambda: augment_batch(img, lbl, aug, gen)[0].contiguous(), 4 * n)
    rows.append(("aug: all, default probabilities (measured)", ms, ms))
    return rows


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def throughput(index, cfg: SamplerConfig, aug: AugmentConfig | None, workers: int, n_patches: int,
               batch_size: int = 2) -> tuple[float, float]:
    """One full epoch of ``n_patches`` through make_loader (workers started and joined inside).

    Returns ``(patches per wall second, patches per CPU second)``; CPU time counts this process
    and its finished workers, so the second number does not depend on other load on the machine.
    """
    ds = PatchDataset(index, dataclasses.replace(cfg, patches_per_epoch=n_patches), seed=0, augment=aug)
    for rec in ds.records:  # warm the cache before forking: workers inherit it
        ds.cache.get(rec)
    loader = make_loader(ds, batch_size=batch_size, num_workers=workers, persistent_workers=False)
    cpu, t = _cpu_seconds(), time.perf_counter()
    n = sum(image.shape[0] for image, _, _ in loader)  # workers exit (and are reaped) at the end
    wall = time.perf_counter() - t
    cpu = _cpu_seconds() - cpu
    return n / wall, n / max(cpu, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/kaggle_utils_bench_sampler"))
    ap.add_argument("--n-volumes", type=int, default=6)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--patches", type=int, default=60, help="patches timed per throughput row")
    args = ap.parse_args()

    t = time.perf_counter()
    root = make_data(args.data_dir, args.n_volumes, args.size)
    print(f"data: {root} ({time.perf_counter() - t:.1f} s to make/find)")
    index = load_index(root, "train")
    rec = max(index.records, key=lambda r: r.image_path.stat().st_size)

    print("\n| cold read (one volume) | ms |")
    print("|---|---|")
    t = time.perf_counter()
    image = read_volume(rec.image_path)
    print(f"| read_volume, LZW {tuple(image.shape)} image | {(time.perf_counter() - t) * 1000:.0f} |")
    t = time.perf_counter()
    read_label(rec.label_path)
    print(f"| read_label, LZW label | {(time.perf_counter() - t) * 1000:.0f} |")
    cache = VolumeCache()
    t = time.perf_counter()
    cache.get(rec)
    print(f"| VolumeCache miss (image+label+stats+surface coords) | {(time.perf_counter() - t) * 1000:.0f} |")
    t = time.perf_counter()
    cache.get(rec)
    print(f"| VolumeCache hit | {(time.perf_counter() - t) * 1000:.3f} |")

    cfg = SamplerConfig(patch_size=(args.patch,) * 3, patches_per_epoch=10_000)
    aug = AugmentConfig()
    ds = PatchDataset(index, cfg, seed=0, augment=aug)
    threads = torch.get_num_threads()
    print(f"\n| step, one {args.patch}^3 patch, 1 thread, warm cache | ms when applied | ms per patch (expected) |")
    print("|---|---|---|")
    for name, ms, exp in breakdown(ds, aug):
        print(f"| {name} | {ms:.1f} | {exp:.1f} |")
    torch.set_num_threads(threads)

    print(f"\n| DataLoader, batch 2, {args.patch}^3 | workers | patches/s (wall) | patches per CPU-second |")
    print("|---|---|---|---|")
    result = {}
    for augmented in (False, True):
        for workers in (0, 2):
            rate, per_cpu = throughput(index, cfg, aug if augmented else None, workers, args.patches)
            result[(augmented, workers)] = rate
            print(f"| {'augmented' if augmented else 'no augmentation'} | {workers} | {rate:.1f} | {per_cpu:.1f} |")
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other jobs share the cores: patches per CPU-second x 2 is the 2-free-core rate)")
    print(f"\npatches/s ({args.patch}^3, augmented, 2 workers): {result[(True, 2)]:.1f}")


if __name__ == "__main__":
    main()
