"""Benchmark: our sliding_window_predict vs MONAI's sliding_window_inference, side by side.

For each network, both run on the same random (1, 1, S, S, S) volume with the same windows
(roi 128^3, overlap 0.5, window batch 2, Gaussian blending, raw outputs); the table gives wall time
(best of --repeats), peak memory above the baseline (RSS high-water mark on CPU,
torch.cuda.max_memory_allocated on CUDA) and the max abs difference of the outputs.

    PYTHONPATH=. .venv/bin/python benchmarks/inference.py                # CPU, 320^3, trivial + resnet18
    PYTHONPATH=. .venv/bin/python benchmarks/inference.py --size 192 --nets resnet18
    PYTHONPATH=. .venv/bin/python benchmarks/inference.py --device cuda  # + volumes/hour, resnet34, fp16, 8x TTA
"""

from __future__ import annotations

import argparse
import gc
import threading
import time

import numpy as np
import torch
from torch import nn

from kaggle_utils.inference import sliding_window_predict


class RSSPeak:
    """Peak resident memory of this process above its value at start (bytes).

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` 5) and reads ``VmHWM`` at the
    end; where that is not allowed, samples ``VmRSS`` every 5 ms in a thread.
    """

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._status("VmRSS") - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> "RSSPeak":
        self.base = self._status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._status("VmRSS") - self.base)
        else:
            self.peak = self._status("VmHWM") - self.base


def build_net(name: str) -> nn.Module:
    if name == "trivial":
        torch.manual_seed(0)
        return nn.Conv3d(1, 1, 1).eval()
    import segmentation_models_pytorch_3d as smp3d

    torch.manual_seed(0)
    return smp3d.Unet(name, encoder_weights=None, in_channels=1, classes=1).eval()


def measure(fn, device: torch.device, repeats: int):
    """Best wall time, peak memory (bytes) and the result of ``fn()``."""
    best, peak, out = float("inf"), 0, None
    for _ in range(repeats):
        out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with RSSPeak() as mem:
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
            peak = max(peak, mem.peak)
        best = min(best, dt)
    return best, peak, out


def compare(net_name: str, args, device: torch.device) -> list[str]:
    from monai.inferers import sliding_window_inference

    net = build_net(net_name).to(device)
    vol = np.random.default_rng(0).standard_normal((args.size,) * 3).astype(np.float32)
    roi = (args.roi,) * 3

    def ours(channels_last: bool = False):
        return sliding_window_predict(
            net, vol, roi, overlap=args.overlap, batch_size=args.batch, blend="gaussian",
            activation=None, device=device, amp=False, channels_last=channels_last,
        )

    def monai():
        x = torch.from_numpy(vol)[None, None]  # MONAI's usual use: volume on the host
        with torch.inference_mode():
            y = sliding_window_inference(
                x, roi, args.batch, net, overlap=args.overlap, mode="gaussian", sw_device=device, device="cpu"
            )
        return y[0, 0].numpy()

    methods = [("MONAI", monai), ("ours", ours)]
    if args.channels_last:
        methods.append(("ours channels_last", lambda: ours(True)))
    results = {}
    for _ in range(args.repeats):  # interleaved, best of repeats: fair on a shared machine
        for name, fn in methods:
            t, m, out = measure(fn, device, 1)
            if name == "ours channels_last":
                net.to(memory_format=torch.contiguous_format)  # leave the net as MONAI gets it
            best_t, best_m, _ = results.get(name, (float("inf"), 0, None))
            results[name] = (min(best_t, t), max(best_m, m), out)
    t_m, _, o_m = results["MONAI"]
    rows = []
    for name, (t, m, out) in results.items():
        diff = float(np.abs(o_m - out).max())
        rows.append(
            f"| {net_name} | {name} | {args.size}^3 | {args.roi}^3 | {t:8.2f} | {t / t_m:5.2f} | "
            f"{m / 2**20:8.0f} | {diff:.1e} |"
        )
    return rows


def volumes_per_hour(args, device: torch.device) -> list[str]:
    """Ours only: resnet34 U-Net, fp16 autocast, 8x flip TTA, on a (size)^3 volume."""
    net = build_net("resnet34").to(device)
    vol = np.random.default_rng(0).standard_normal((args.size,) * 3).astype(np.float32)
    rows = []
    for roi in (128, 192):
        def run():
            return sliding_window_predict(
                net, vol, roi, overlap=args.overlap, batch_size=args.batch, tta="flips", amp="auto", device=device
            )

        # warm-up on one window (CUDA context, cuDNN kernels) so it is not counted
        sliding_window_predict(net, vol[:roi, :roi, :roi], roi, batch_size=args.batch, amp="auto", device=device)
        t, m, _ = measure(run, device, 1)
        rows.append(f"| resnet34 | {args.size}^3 | {roi}^3 | fp16 + 8x TTA | {t:8.2f} | {3600 / t:8.1f} | {m / 2**20:8.0f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", type=int, default=320, help="edge of the cubic test volume")
    p.add_argument("--roi", type=int, default=128, help="window edge")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2, help="windows per forward pass")
    p.add_argument("--nets", default="trivial,resnet18", help="comma list: trivial, resnet18, resnet34, ...")
    p.add_argument("--repeats", type=int, default=1, help="runs per method; the best time is kept")
    p.add_argument("--channels-last", action="store_true", help="also time ours with channels_last=True")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| net | method | volume | roi | time s | vs MONAI | peak MiB | max abs diff to MONAI |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.nets.split(","):
        for row in compare(name.strip(), args, device):
            print(row, flush=True)
    if device.type == "cuda":
        print()
        print("| net | volume | roi | mode | s/volume | volumes/hour | peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for row in volumes_per_hour(args, device):
            print(row, flush=True)
    else:
        print("\nvolumes/hour (resnet34, fp16, 8x TTA): not measured (run with --device cuda)")


if __name__ == "__main__":
    main()
