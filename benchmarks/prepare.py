"""Benchmark ``python -m kaggle_utils prepare``: time and disk per 320^3 volume, and the projection to the
competition's 786 training volumes (738 of 320^3, 47 of 256^3, one of 384^3).

Measures, on a synthetic competition folder of LZW TIFFs (``kaggle_utils.synthetic``, made once into
``--data-dir`` with ``--n-volumes`` volumes of ``--size``):

- decoding alone (``read_volume`` + ``read_label``), per volume;
- ``prepare`` with ``--labels npy`` and ``packed`` on 1 thread, and ``npy`` on ``--workers`` threads:
  wall seconds per 320^3-equivalent volume (seconds x 320^3 / voxels);
- disk per 320^3 volume: image, labels (npy / packed), surface index, entry;
- what a run pays at start on a prepared cache (``open_prepared`` checking the source fingerprints) and
  without one (``read_tiff_shape`` of every image for the memory plan).

Run (under ``nice``; about 5 minutes on 2 cores once the data exist)::

    PYTHONPATH=. nice .venv/bin/python benchmarks/prepare.py --data-dir /tmp/prep320 --out /tmp/prep-bench

The last line is ``prepare: N s and M MB per 320^3 volume (labels packed, 1 thread)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from kaggle_utils.data import load_index, read_label, read_tiff_shape, read_volume
from kaggle_utils.prepare import open_prepared, prepare

V320 = 320**3
# the competition's training volumes (COMPETITION.md)
REAL = {"320": (738, 320**3), "256": (47, 256**3), "384": (1, 384**3)}
REAL_VOXELS = sum(n * v for n, v in REAL.values())


def _data(args: argparse.Namespace) -> Path:
    if not (args.data_dir / "train.csv").is_file():
        from kaggle_utils.synthetic import generate_dataset

        generate_dataset(args.data_dir, n_train=args.n_volumes, n_test=1, size=args.size, n_scrolls=2, seed=0)
    return args.data_dir


def _decode(index) -> dict:
    t = []
    for rec in index:
        t0 = time.perf_counter()
        read_volume(rec.image_path)
        read_label(rec.label_path)
        t.append(time.perf_counter() - t0)
    return {"decode_s_per_volume": float(np.mean(t))}


def _prepare(data: Path, out: Path, voxels: int, labels: str, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = prepare(data, out, labels=labels, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    sizes: dict[str, int] = {}
    for p in (out / "volumes").iterdir():
        kind = p.name.split(".", 1)[1]
        sizes[kind] = sizes.get(kind, 0) + p.stat().st_size
    per320 = {k: v * V320 / voxels for k, v in sizes.items()}
    return {"labels": labels, "workers": workers, "n": report.n_volumes, "wall_s": wall,
            "s_per_320": wall * V320 / voxels, "bytes_per_320": per320,
            "disk_per_320": sum(per320.values()), "total_disk": report.disk_bytes}


def _start_costs(data: Path, out: Path) -> dict:
    index = load_index(data, "train")
    t0 = time.perf_counter()
    open_prepared(out, index.records)
    t_check = (time.perf_counter() - t0) / len(index)
    t0 = time.perf_counter()
    for rec in index:
        read_tiff_shape(rec.image_path)
    t_shape = (time.perf_counter() - t0) / len(index)
    return {"check_ms_per_volume": 1000 * t_check, "tiff_shape_ms_per_volume": 1000 * t_shape}


def _project(rows: list[dict], decode: dict, voxels: int, n: int) -> dict:
    """786 volumes: time on 1 thread and on 4 (scaled by the measured 1 -> N thread speed-up), disk."""
    one = {r["labels"]: r for r in rows if r["workers"] == 1}
    multi = [r for r in rows if r["workers"] > 1]
    real320 = REAL_VOXELS / V320
    out = {"volumes_320_equiv": real320}
    for labels, r in one.items():
        out[f"hours_1_thread_{labels}"] = r["s_per_320"] * real320 / 3600
        out[f"disk_gb_{labels}"] = r["disk_per_320"] * real320 / 1e9
    if multi:
        speedup = one["npy"]["s_per_320"] / multi[0]["s_per_320"]
        out["speedup"] = speedup
        out["workers"] = multi[0]["workers"]
    out["decode_hours_1_thread"] = decode["decode_s_per_volume"] * n / voxels * REAL_VOXELS / 3600
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/prep320"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/prep-bench"))
    ap.add_argument("--n-volumes", type=int, default=4)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    data = _data(args)
    index = load_index(data, "train")
    voxels = sum(int(np.prod(read_tiff_shape(r.image_path))) for r in index)
    src = sum(r.image_path.stat().st_size + r.label_path.stat().st_size for r in index)
    decode = _decode(index)
    rows = [_prepare(data, args.out / f"{lab}-1", voxels, lab, 1) for lab in ("npy", "packed")]
    rows.append(_prepare(data, args.out / f"npy-{args.workers}", voxels, "npy", args.workers))
    start = _start_costs(data, args.out / "npy-1")
    result = {"n_volumes": len(index), "voxels": voxels, "source_bytes_per_320": src * V320 / voxels,
              **decode, "rows": rows, "start": start, "projection": _project(rows, decode, voxels, len(index)),
              "load_before": load0, "load_after": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))
    (args.out / "prepare.json").write_text(json.dumps(result, indent=1))
    packed = next(r for r in rows if r["labels"] == "packed")
    print(f"prepare: {packed['s_per_320']:.2f} s and {packed['disk_per_320'] / 1e6:.1f} MB per 320^3 volume "
          f"(labels packed, 1 thread)")


if __name__ == "__main__":
    main()
