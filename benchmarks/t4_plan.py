"""The T4 plan on paper (issue 23): FLOPs and activation memory of every Kaggle preset, projected to a
Kaggle T4, and how many models x which TTA fit the ~120 hidden test volumes in the 9-hour rerun.

Everything here is **projected**, not measured on a T4. The method:

* FLOPs of one training step (forward + backward, deep supervision as configured) and of one inference
  window are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
  (``kaggle_utils.plan.step_cost`` / ``forward_cost``); the activation memory is the bytes autograd saves
  for the backward pass, counted once per storage, in float16 and in float32 (AMP lies between).
* The T4's throughput on this kind of network is taken from a published measurement of a comparable
  3D U-Net: nnU-Net's "expected epoch times" (MIC-DKFZ/nnUNet, documentation/expected_epoch_times.md,
  nnU-Net v1, PyTorch 1.7.1, cuDNN 8.1, mixed precision): Task002_Heart 3d_fullres with dummy data
  (GPU only), 250 iterations of a plain nnU-Net at patch 80x192x160, batch 2: 138.4 s on an RTX 2080 Ti,
  89.7 s on a V100 PCIe. Its FLOPs per iteration are counted here with the same network built by
  dynamic-network-architectures (:func:`heart_reference_flops`). The 2080 Ti is the T4's architecture
  (Turing) at ~2x its memory bandwidth (616 vs 320 GB/s) and 250 W instead of 70 W; the projection scales
  its achieved TFLOP/s by the bandwidth ratio (:data:`T4_TFLOPS`), and an optimistic column keeps the
  2080 Ti's share of peak (22 %) at the T4's 65 TFLOP/s.
* step time = step FLOPs / T4 rate; a fold = steps x step time (+ the GPU part of validation);
  predict per 320^3 volume = windows x TTA passes x models x window FLOPs / T4 rate + CPU time per volume.

``benchmarks/gpu.py`` measures each of these on a real GPU; on a T4 its numbers replace the projections
column by column (step s, peak GiB, predict s per volume).

    PYTHONPATH=. python benchmarks/t4_plan.py            # prints the Markdown tables of BENCHMARKS.md
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kaggle_utils.plan import T4, forward_cost, step_cost, window_count  # noqa: E402
from kaggle_utils.train import load_train_config  # noqa: E402

PRESETS = ("kaggle-t4-resenc-m", "kaggle-t4-resenc-m-ft192", "kaggle-t4")

#: nnU-Net v1 expected epoch times, Task002_Heart 3d_fullres dummy load, seconds per 250 iterations.
HEART_EPOCH_S = {"RTX 2080 Ti": 138.4, "V100 PCIe": 89.66}
#: fp16 tensor-core peaks with float32 accumulation (TFLOP/s) and memory bandwidths (GB/s), vendor figures.
PEAK = {"RTX 2080 Ti": (53.8, 616.0), "V100 PCIe": (112.0, 900.0)}

TEST_VOLUMES = 120
RERUN_S = 9 * 3600 * 0.9  # predict.DEFAULT_TIME_LIMIT_S: the 9-hour rerun with 10 % in reserve
CPU_S_PER_VOLUME = 13.0  # post-processing of one 320^3 volume, tuned chain (BENCHMARKS.md "Post-processing")


def heart_reference_flops() -> float:
    """FLOPs of one Task002_Heart 3d_fullres iteration (plain nnU-Net, 80x192x160, batch 2, deep supervision).

    nnU-Net v1's plan: 6 resolutions, 2 convolutions per stage, z pooled 4x and y/x 5x; features 32..320
    here (v1 started at 30: about 12 % fewer FLOPs, so the reference efficiency is slightly overstated).
    """
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = PlainConvUNet(
            input_channels=1, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
            kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
            num_classes=2, n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5, conv_bias=True,
            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True}, deep_supervision=True)
    x = torch.empty((2, 1, 80, 192, 160), device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        sum(o.float().sum() for o in net(x)).backward()
    return float(counter.get_total_flops())


def t4_rates(heart_flops: float) -> tuple[float, float, list[str]]:
    """``(projected T4 TFLOP/s, optimistic T4 TFLOP/s, explanation lines)``."""
    lines = []
    achieved = {}
    for gpu, epoch_s in HEART_EPOCH_S.items():
        achieved[gpu] = heart_flops * 250 / epoch_s / 1e12
        peak, bw = PEAK[gpu]
        lines.append(f"| {gpu} | {epoch_s / 250:.3f} | {achieved[gpu]:.1f} | {100 * achieved[gpu] / peak:.1f} % of "
                     f"{peak:g} | {bw:g} |")
    ref = achieved["RTX 2080 Ti"]
    projected = ref * T4.bandwidth_gbs / PEAK["RTX 2080 Ti"][1]
    optimistic = T4.fp16_tflops * ref / PEAK["RTX 2080 Ti"][0]
    return projected, optimistic, lines


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def preset_rows(rate: float, optimistic: float) -> tuple[list[str], dict[str, float]]:
    """Per preset: params, step FLOPs, activations, memory, T4 step time, fold time, predict time per volume."""
    rows, per_pass = [], {}
    for name in PRESETS:
        cfg = load_train_config(name)
        tc, sc = cfg.train, cfg.sampler
        c32 = step_cost(cfg.model, sc.patch_size, tc.batch_size, cfg.loss.deep_supervision)
        c16 = step_cost(cfg.model, sc.patch_size, tc.batch_size, cfg.loss.deep_supervision, dtype=torch.float16)
        state = c32.params * 4 * (3 + (2 if cfg.optim.name == "AdamW" else 1) + int(tc.ema))  # w, grad, opt, ema
        step_s = c32.step_flops / (rate * 1e12)
        steps_per_epoch = math.ceil(sc.patches_per_epoch / tc.batch_size)
        if tc.time_budget_s:
            fold = f"budget {tc.time_budget_s / 3600:g} h: {int(tc.time_budget_s * (1 - tc.budget_reserve) // (steps_per_epoch * step_s))} epochs"
        else:
            fold = f"{tc.epochs} x {steps_per_epoch} steps: {tc.epochs * steps_per_epoch * step_s / 3600:.1f} h"
        inf = cfg.inference
        windows = window_count((320, 320, 320), inf.patch_size, inf.overlap)
        per_pass[name] = windows * forward_cost(cfg.model, inf.patch_size) / (rate * 1e12)
        rows.append(
            f"| `{name}` | {c32.params / 1e6:.1f} M | {'x'.join(map(str, sc.patch_size))} x{tc.batch_size} | "
            f"{c32.step_flops / 1e12:.2f} | {_gib(c16.saved_bytes)}-{_gib(c32.saved_bytes)} | "
            f"{_gib(c16.saved_bytes + state)}-{_gib(c32.saved_bytes + state)} | {step_s:.2f} "
            f"({c32.step_flops / (optimistic * 1e12):.2f}) | {steps_per_epoch * step_s / 60:.1f} | {fold} | "
            f"{windows} x {forward_cost(cfg.model, inf.patch_size) / 1e12:.2f} | {per_pass[name]:.1f} | "
            f"{8 * per_pass[name]:.0f} |")
    return rows, per_pass


def rerun_table(per_pass: dict[str, float]) -> list[str]:
    """Models x TTA that fit :data:`TEST_VOLUMES` volumes in :data:`RERUN_S` on one and on two T4s."""
    out = ["| models (each like `kaggle-t4-resenc-m`) | TTA passes | s per volume | 120 volumes, 1 T4 | "
           "fits 8.1 h on 1 T4 | fits on 2 T4 (ids split over 2 processes) |", "|---|---|---|---|---|---|"]
    p = per_pass["kaggle-t4-resenc-m"]
    for models in (1, 2, 3, 4, 5):
        for passes in (1, 2, 4, 8):
            gpu_s = models * passes * p
            total = TEST_VOLUMES * (gpu_s + CPU_S_PER_VOLUME)
            two = TEST_VOLUMES / 2 * (gpu_s + CPU_S_PER_VOLUME)
            out.append(f"| {models} | {passes} | {gpu_s + CPU_S_PER_VOLUME:.0f} | {total / 3600:.1f} h | "
                       f"{'yes' if total <= RERUN_S else 'no'} | {'yes' if two <= RERUN_S else 'no'} |")
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    heart = heart_reference_flops()
    rate, optimistic, ref_lines = t4_rates(heart)
    print(f"Reference: nnU-Net Task002_Heart 3d_fullres, {heart / 1e12:.2f} TFLOP per iteration (counted)\n")
    print("| GPU | s/iteration (published) | achieved TFLOP/s | share of fp16 peak | GB/s |")
    print("|---|---|---|---|---|")
    print("\n".join(ref_lines))
    print(f"\nT4 rate: projected {rate:.2f} TFLOP/s ({100 * rate / T4.fp16_tflops:.1f} % of 65), "
          f"optimistic {optimistic:.2f} TFLOP/s\n")
    rows, per_pass = preset_rows(rate, optimistic)
    print("| preset | params | patch x batch | TFLOP/step | activations GiB (fp16-fp32) | + weights, grads, "
          "optimizer, EMA GiB | T4 s/step (optimistic) | T4 min/epoch | fold | 320^3 windows x TFLOP | "
          "T4 s per TTA pass | T4 s per volume, 8x TTA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(rerun_table(per_pass)))


if __name__ == "__main__":
    main()
