"""Benchmark and inspect the loss terms of kaggle_utils.losses.

1. ``time``: forward+backward time per term (and per preset) on ``B×1×S³`` float32 logits on the
   CPU, beside MONAI's DiceFocalLoss and SoftclDiceLoss on the same tensors (MONAI has no ignore
   label, so it sees label 2 as background there; the timing is what is compared).
2. ``regularizers``: value and gradient size of every seed-v2 term for an ideal prediction and for
   collapsed ones, on a synthetic target with thin sheets and a large ignore region, with the
   ignore label (``ignore_label=2``) and as the seed had it (``None``: label 2 is foreground).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/losses.py [--size 128] [--repeats 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kaggle_utils import losses as L


def synthetic_target(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``(B,1,S,S,S)`` uint8: wavy 2-voxel sheets (1), an unlabeled band around them and a border (2)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.arange(size).view(size, 1, 1).float()
    y = torch.arange(size).view(1, size, 1).float()
    x = torch.arange(size).view(1, 1, size).float()
    out = torch.zeros(batch, 1, size, size, size, dtype=torch.uint8)
    for b in range(batch):
        lab = torch.zeros(size, size, size, dtype=torch.uint8)
        for c in (0.2, 0.5, 0.8):
            ph = torch.rand(2, generator=g) * 6.28
            h = c * size + 2.0 * torch.sin(y / 9 + ph[0]) + 2.0 * torch.cos(x / 11 + ph[1])
            d = (z - h).abs()
            lab[(d < 7.0) & (lab == 0)] = 2
            lab[d < 1.0] = 1
        lab[:3], lab[-3:], lab[:, :3], lab[:, -3:], lab[:, :, :3], lab[:, :, -3:] = 2, 2, 2, 2, 2, 2
        out[b, 0] = lab
    return out


def _time(fn, logits, target, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        x = logits.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = fn(x, target)
        (out[0] if isinstance(out, tuple) else out).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # first call warms up


def bench_time(size: int, repeats: int) -> list[tuple[str, float]]:
    g = torch.Generator().manual_seed(0)
    target = synthetic_target(size, 2)
    logits = torch.randn(target.shape, generator=g)
    rows = []
    for name in L.TERM_NAMES:
        rows.append((name, _time(L.CompositeLoss({name: 1.0}), logits, target, repeats)))
    for preset in ("default", "seed-v1", "seed-v2"):
        rows.append((f"preset {preset}", _time(L.build_loss(preset), logits, target, repeats)))
    try:
        from monai.losses import DiceFocalLoss, SoftclDiceLoss
    except ImportError:
        return rows
    fg = (target == 1).float()
    rows.append(("MONAI DiceFocalLoss", _time(lambda x, t: DiceFocalLoss(sigmoid=True)(x, fg), logits, target, repeats)))
    rows.append(("MONAI SoftclDiceLoss(iter 3)", _time(lambda x, t: SoftclDiceLoss(iter_=3, sigmoid=True)(x, fg),
                                                       logits, target, repeats)))
    return rows


def bench_regularizers(size: int = 64) -> list[tuple]:
    target = synthetic_target(size, 2)
    shares = {k: (target == k).float().mean().item() for k in (0, 1, 2)}
    print(f"synthetic target {tuple(target.shape)}: label shares 0={shares[0]:.3f} 1={shares[1]:.3f} 2={shares[2]:.3f}")
    sure = 3.0  # p = 0.95: confident but not saturated, so gradients are visible
    preds = {
        "ideal (label 1)": ((target == 1).float() * 2 - 1) * sure,
        "label>0 (1 and 2)": ((target > 0).float() * 2 - 1) * sure,
        "collapsed all-fg": torch.full(target.shape, sure),
        "uniform p=0.5": torch.zeros(target.shape),
    }
    rows = []
    for ignore in (2, None):
        loss = L.CompositeLoss({k: 1.0 for k in ("dice", "focal", "boundary", "cldice", "connectivity",
                                                 "variance", "entropy")}, ignore_label=ignore,
                               variance_form="v2", entropy_form="v2")
        weighted = L.build_loss("seed-v2", ignore_label=ignore)
        for pname, logits in preds.items():
            x = logits.clone().requires_grad_(True)
            _, parts = loss(x, target)
            grads = {}
            for k in ("variance", "entropy"):
                xg = logits.clone().requires_grad_(True)
                L.CompositeLoss({k: 1.0}, ignore_label=ignore, variance_form="v2", entropy_form="v2")(xg, target)[0].backward()
                grads[k] = xg.grad.abs().sum().item()
            total = weighted(logits, target)[1]["total"].item()
            rows.append((str(ignore), pname, *(parts[k].item() for k in ("dice", "focal", "boundary", "cldice",
                                                                          "connectivity", "variance", "entropy")),
                         grads["variance"], grads["entropy"], total))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["time", "regularizers"], default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.only in (None, "regularizers"):
        rows = bench_regularizers()
        print("\n| ignore_label | prediction | dice | focal | boundary | cldice | connectivity | var v2 | ent v2 "
              "| Σ|∂var/∂z| | Σ|∂ent/∂z| | seed-v2 total |")
        print("|---|---|" + "---|" * 10)
        for r in rows:
            print(f"| {r[0]} | {r[1]} | " + " | ".join(f"{v:.4f}" for v in r[2:9]) + f" | {r[9]:.3g} | {r[10]:.3g} | {r[11]:.4f} |")
    if a.only in (None, "time"):
        rows = bench_time(a.size, a.repeats)
        print(f"\nforward+backward, 2x1x{a.size}^3 float32 on CPU, {a.threads} threads, median of {a.repeats}")
        print("| loss | seconds |\n|---|---|")
        for name, s in rows:
            print(f"| {name} | {s:.3f} |")


if __name__ == "__main__":
    main()
