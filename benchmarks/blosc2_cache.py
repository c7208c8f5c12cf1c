"""The prepared cache's storage: memory-mapped ``.npy`` (what ``prepare`` writes) against blosc2 (issue 22).

``prepare`` decodes the LZW TIFFs once into ``.npy`` files that every rank and DataLoader worker
memory-maps. blosc2 (installed in Kaggle's image) stores an N-d array in compressed chunks and
decompresses only the chunks a slice touches. This measures, per 320^3 volume, for the image and
the label separately:

- **disk**: bytes on disk (``.npy``: 32.8 MB; packed 2-bit labels: a quarter);
- **write**: seconds to write one volume (one thread);
- **patch read**: CPU milliseconds (of the process; one decompression thread, as in a DataLoader worker) to read one random
  ``--patch``^3 patch from the file, the file warm in the page cache, median of ``--patches``;
- **volume read**: seconds to read the whole volume (what validation and ``prepare``'s checks do).

Variants: ``npy`` (``np.load(mmap_mode="r")``), ``packed`` (labels: 2 bits per voxel,
:func:`kaggle_utils.prepare.unpack_labels`), and blosc2 NDArrays for each codec / level / filter /
chunk shape in the grid below (blocks 32^3 inside chunks of ``--chunks``; one decompression thread).

Inputs: ``--n-volumes`` synthetic volumes of ``--size``^3 (``kaggle_utils.synthetic.make_volume``,
cached in ``--work``). **Caveat**: the synthetic image is smooth structure plus white noise; real CT
crops have their own noise and the compression ratio of images does not transfer. The labels
(0/1/2 in large regions) are far closer to the real ones.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/blosc2_cache.py --work /tmp/ku_blosc2`` (about 5 min
on 2 cores, plus ~1 min per volume the first time). Results: BENCHMARKS.md, "The prepared cache:
.npy or blosc2".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1e6


def load_volumes(work: Path, n: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` synthetic ``(image, label)`` pairs of ``size``^3, generated once and cached as ``.npy``."""
    from kaggle_utils.synthetic import make_volume

    out = []
    for seed in range(n):
        img_f, lab_f = work / f"vol{seed}_{size}.image.npy", work / f"vol{seed}_{size}.label.npy"
        if not (img_f.exists() and lab_f.exists()):
            image, label = make_volume((size,) * 3, seed=seed)
            np.save(img_f, image)
            np.save(lab_f, label)
        out.append((np.load(img_f), np.load(lab_f)))
    return out


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _patch_starts(shape: tuple[int, ...], patch: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n - patch + 1, size=count) for n in shape], axis=1)


def _time_patches(read, starts: np.ndarray, patch: int) -> float:
    """Median CPU milliseconds (of the whole process: a codec's own threads count) of
    ``read(z, y, x, patch)`` over ``starts``, after one warm-up read."""
    read(*starts[0], patch)
    times = []
    for z, y, x in starts:
        t = time.process_time()
        arr = read(int(z), int(y), int(x), patch)
        times.append(time.process_time() - t)
        assert arr.shape == (patch,) * 3
    return 1e3 * float(np.median(times))


def _warm(path: Path) -> None:
    """Read every file under ``path`` once, so the page cache holds it (as after a few epochs)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def bench_npy(arr: np.ndarray, folder: Path, starts: np.ndarray, patch: int) -> dict:
    path = folder / "a.npy"
    t = time.perf_counter()
    np.save(path, arr)
    write = time.perf_counter() - t
    _warm(path)
    mm = np.load(path, mmap_mode="r")
    ms = _time_patches(lambda z, y, x, p: np.ascontiguousarray(mm[z:z + p, y:y + p, x:x + p]), starts, patch)
    t = time.perf_counter()
    full = np.array(np.load(path, mmap_mode="r"))
    vol_s = time.perf_counter() - t
    assert np.array_equal(full, arr)
    return {"bytes": _dir_bytes(path), "write_s": write, "patch_ms": ms, "volume_s": vol_s}


def bench_packed(label: np.ndarray, folder: Path, starts: np.ndarray, patch: int) -> dict:
    from kaggle_utils.prepare import PackedLabel, pack_labels

    path = folder / "a.label2b.npy"
    t = time.perf_counter()
    np.save(path, pack_labels(label))
    write = time.perf_counter() - t
    _warm(path)
    packed = PackedLabel(np.load(path, mmap_mode="r"), label.shape)
    ms = _time_patches(lambda z, y, x, p: packed[z:z + p, y:y + p, x:x + p], starts, patch)
    t = time.perf_counter()
    full = packed[:, :, :]
    vol_s = time.perf_counter() - t
    assert np.array_equal(full, label)
    return {"bytes": _dir_bytes(path), "write_s": write, "patch_ms": ms, "volume_s": vol_s}


def bench_blosc2(arr: np.ndarray, folder: Path, starts: np.ndarray, patch: int, codec: str, clevel: int,
                 filt: str, chunks: int, blocks: int) -> dict:
    import blosc2

    path = folder / "a.b2nd"
    cparams = blosc2.CParams(codec=getattr(blosc2.Codec, codec), clevel=clevel,
                             filters=[getattr(blosc2.Filter, filt)], nthreads=1)
    t = time.perf_counter()
    blosc2.asarray(arr, urlpath=str(path), mode="w", chunks=(chunks,) * 3, blocks=(blocks,) * 3,
                   cparams=cparams, dparams=blosc2.DParams(nthreads=1))
    write = time.perf_counter() - t
    _warm(path)
    nd = blosc2.open(str(path), mode="r", dparams=blosc2.DParams(nthreads=1))
    ms = _time_patches(lambda z, y, x, p: nd[z:z + p, y:y + p, x:x + p], starts, patch)
    t = time.perf_counter()
    full = nd[:]
    vol_s = time.perf_counter() - t
    assert np.array_equal(full, arr)
    return {"bytes": _dir_bytes(path), "write_s": write, "patch_ms": ms, "volume_s": vol_s}


GRID = [  # (codec, clevel, filter, chunks, blocks)
    ("LZ4", 5, "SHUFFLE", 64, 32),
    ("ZSTD", 1, "SHUFFLE", 64, 32),
    ("ZSTD", 5, "SHUFFLE", 64, 32),
    ("ZSTD", 1, "BITSHUFFLE", 64, 32),
    ("ZSTD", 1, "SHUFFLE", 128, 32),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the volumes and the files written")
    ap.add_argument("--n-volumes", type=int, default=2)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--patches", type=int, default=60, help="random patches timed per variant")
    args = ap.parse_args(argv)
    try:
        import blosc2
    except ImportError:
        print("blosc2 is not installed: pip install blosc2", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    vols = load_volumes(args.work, args.n_volumes, args.size)
    rows: dict[tuple[str, str], list[dict]] = {}
    for k, (image, label) in enumerate(vols):
        starts = _patch_starts(image.shape, args.patch, args.patches, seed=k)
        for kind, arr in (("image", image), ("label", label)):
            variants = [("npy", lambda f, a=arr: bench_npy(a, f, starts, args.patch))]
            if kind == "label":
                variants.append(("packed 2-bit", lambda f, a=arr: bench_packed(a, f, starts, args.patch)))
            for codec, lvl, filt, ch, bl in GRID:
                name = f"blosc2 {codec.lower()}-{lvl} {filt.lower()} chunks {ch}³"
                variants.append((name, lambda f, a=arr, g=(codec, lvl, filt, ch, bl):
                                 bench_blosc2(a, f, starts, args.patch, *g)))
            for name, run in variants:
                folder = args.work / "out"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                rows.setdefault((kind, name), []).append(run(folder))
                shutil.rmtree(folder, ignore_errors=True)
    voxels = args.size ** 3
    print(f"blosc2 {blosc2.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs; {len(vols)} volumes of "
          f"{args.size}³, {args.patches} random {args.patch}³ patches each (process CPU, median), files warm in the page cache")
    print("| data | storage | MB per volume (per 320³) | ratio to raw | write s | patch read ms | volume read s |")
    print("|---|---|---|---|---|---|---|")
    for (kind, name), rs in rows.items():
        mb = np.mean([r["bytes"] for r in rs]) / MB
        per320 = mb * 320 ** 3 / voxels
        print(f"| {kind} | {name} | {mb:.1f} ({per320:.1f}) | {voxels / MB / mb:.2f}× | "
              f"{np.mean([r['write_s'] for r in rs]):.2f} | {np.mean([r['patch_ms'] for r in rs]):.2f} | "
              f"{np.mean([r['volume_s'] for r in rs]):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
