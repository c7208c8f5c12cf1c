"""Measure the per-item estimates of ``kaggle_utils.memory`` on this machine (CPU).

1. ``WORKER_BYTES``: the unique resident memory (``Private_Clean + Private_Dirty`` of ``/proc/PID/smaps_rollup``)
   of each DataLoader worker of a ``PatchDataset`` over a prepared cache (so the number holds no decoded
   volume), after ``--batches`` batches of 128^3 patches.
2. ``VALIDATION_BYTES_PER_VOXEL``: the peak resident memory that ``train.validate_volumes`` adds while it
   validates one volume (``n_score`` 1: the competition metric included) with a small network on CPU, per
   voxel of that volume (a fresh process per measurement: ``ru_maxrss`` minus the resident size before).
3. ``PREDICT_BYTES_PER_VOXEL``: the same for ``inference.predict_volume`` + ``postprocess`` on CPU.

Run (a synthetic folder with a 320^3 volume, e.g. from benchmarks/prepare.py)::

    PYTHONPATH=. nice .venv/bin/python benchmarks/memory.py --data-dir /tmp/prep320
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

TINY_MODEL = {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [16, 16, 8, 8, 4]}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _uss(pid: int) -> int:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def _workers(data: Path, batches: int) -> dict:
    import torch

    from kaggle_utils.data import load_index
    from kaggle_utils.prepare import prepare
    from kaggle_utils.sampling import PatchDataset, SamplerConfig, make_loader

    cache = Path(tempfile.mkdtemp()) / "cache"
    prepare(data, cache, labels="packed", progress=False)
    ds = PatchDataset(load_index(data, "train"), SamplerConfig(prepared=str(cache), patches_per_epoch=4 * batches))
    loader = make_loader(ds, batch_size=2, num_workers=2)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    pids = [w.pid for w in it._it._workers]  # PatchLoader wraps the DataLoader iterator
    uss = [_uss(p) for p in pids]
    del it, loader
    torch.cuda.empty_cache()
    return {"worker_uss_bytes": uss, "main_rss_bytes": _rss()}


def _one_validation(data: Path, kind: str) -> dict:
    """In this (fresh) process: RSS before and peak during one validation or prediction of the largest volume."""
    import numpy as np
    import torch

    from kaggle_utils.config import from_dict
    from kaggle_utils.data import load_index, normalize_intensity, read_tiff_shape
    from kaggle_utils.models import build_model
    from kaggle_utils.train import TrainConfig, validate_volumes

    torch.set_num_threads(2)
    index = load_index(data, "train")
    rec = max(index, key=lambda r: int(np.prod(read_tiff_shape(r.image_path))))
    voxels = int(np.prod(read_tiff_shape(rec.image_path)))
    cfg = from_dict(TrainConfig, {"model": TINY_MODEL, "sampler": {"patch_size": [128, 128, 128]},
                                  "validation": {"n_score": 1, "patch_size": [128, 128, 128], "overlap": 0.25},
                                  "inference": {"patch_size": [128, 128, 128], "tta": "none"}})
    model = build_model(cfg.model).eval()
    base = _rss()
    with torch.no_grad():
        if kind == "validation":
            validate_volumes(model, [rec], cfg, torch.device("cpu"))
        else:
            from kaggle_utils.data import read_volume
            from kaggle_utils.inference import predict_volume
            from kaggle_utils.postprocess import postprocess

            prob = predict_volume(model, normalize_intensity(read_volume(rec.image_path)), cfg.inference, "cpu")
            postprocess(prob, cfg.postprocess)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": kind, "voxels": voxels, "shape": list(read_tiff_shape(rec.image_path)), "rss_before": base,
            "peak": peak, "bytes_per_voxel": (peak - base) / voxels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--one", choices=("validation", "predict"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one_validation(args.data_dir, args.one)))
        return
    result = {"load_before": os.getloadavg()[0], "workers": _workers(args.data_dir, args.batches)}
    for kind in ("validation", "predict"):
        out = subprocess.run([sys.executable, __file__, "--data-dir", str(args.data_dir), "--one", kind],
                             capture_output=True, text=True, check=True)
        result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=1))
    mib = 1024**2
    print(f"worker USS {max(result['workers']['worker_uss_bytes']) / mib:.0f} MiB; validation "
          f"{result['validation']['bytes_per_voxel']:.1f} B/voxel, predict {result['predict']['bytes_per_voxel']:.1f} "
          f"B/voxel (CPU, {result['validation']['shape']})")


if __name__ == "__main__":
    main()
