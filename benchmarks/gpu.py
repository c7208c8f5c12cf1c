"""The one-call GPU check (issue 23): what only a GPU can show, measured in one short run.

For each shipped Kaggle preset (``kaggle_utils/configs/kaggle-t4*.yaml``):

* **train step** at the preset's patch size and batch, ``train.amp`` fp16, without and with
  ``train.channels_last``: ``kaggle_utils.plan.dry_run`` (the real ``train`` set-up and
  ``_train_step``: loader with the preset's workers, GradScaler, EMA, deep supervision), giving seconds
  per step, data-loader wait share, peak GPU memory (``torch.cuda.max_memory_allocated``) and achieved
  TFLOP/s (FLOPs counted by ``plan.step_cost``);
* **predict** of one 320^3 volume with the preset's inference settings and 8x flip TTA through
  ``inference.predict_volume`` (the path of ``predict`` and of training's out-of-fold pass): seconds,
  peak memory, windows x passes;
* **fp16 vs fp32 agreement** of the probabilities (no TTA; a model after a few dozen training steps on
  the synthetic data): max |p16 - p32|, the share of voxels whose 0.5-threshold decision flips, and the
  share of voxels within 0.01 of 0.5 (only those can flip);
* a **2-process DDP** dry run (``torchrun ... train --dry-run``) when two GPUs are present (skipped with a
  note otherwise).

It records torch, CUDA, cuDNN and the device, and warns on torch 2.9's slow conv3d AMP
(``device.warn_slow_conv3d_amp``). Data: synthetic volumes made in memory
(``synthetic.make_volume``), written **uncompressed** (no imagecodecs needed) to a temp folder.
Every measurement runs in its own try/except (an error is recorded and the next one runs), a
measurement that would not fit ``--budget-s`` is skipped, and the JSON is rewritten after each one.
The numbers are raw measurements on the device it ran on; no device-to-device factor is applied.

    python benchmarks/gpu.py --device cuda --out OUT_DIR --budget-s 420     # the GPU call (< 8 min)
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu-smoke      # smoke test of the script (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kaggle_utils.config import shipped_configs  # noqa: E402

RESULTS_NAME = "gpu_results.json"
FULL = dict(n_volumes=2, volume=192, predict_volume=320, warmup=3, steps=8, fit_steps=30)
QUICK = dict(n_volumes=2, volume=48, predict_volume=32, warmup=0, steps=1, fit_steps=1)


# ----------------------------------------------------------------------------------------------
# Recording: one JSON file, rewritten after each measurement
# ----------------------------------------------------------------------------------------------


class Recorder:
    """Measurements in order, each ``{name, status: ok|error|skipped, wall_s, ...}``, written to
    ``out/gpu_results.json`` (atomically) after each one; skips what would not fit the budget."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.t0 = out, budget_s, time.monotonic()
        self.data: dict[str, Any] = {"env": {}, "measurements": [], "budget_s": budget_s}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def write(self) -> None:
        self.data["elapsed_s"] = time.monotonic() - self.t0
        tmp = self.out / f".{RESULTS_NAME}.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / RESULTS_NAME)

    def run(self, name: str, estimate_s: float, fn: Callable[[], dict]) -> dict:
        """Run ``fn`` (returns a dict of numbers) as measurement ``name``, unless ``estimate_s`` exceeds the budget left."""
        row: dict[str, Any] = {"name": name}
        if self.left() < estimate_s:
            row.update(status="skipped", note=f"budget: {self.left():.0f} s left, needs ~{estimate_s:.0f} s")
        else:
            t = time.monotonic()
            try:
                row.update(fn())
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - recorded, and the next measurement runs
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}",
                           traceback=traceback.format_exc()[-2000:])
            row["wall_s"] = time.monotonic() - t
            _free()
        self.data["measurements"].append(row)
        print(f"[{time.monotonic() - self.t0:6.1f} s] {name}: {row['status']}"
              + (f" ({row.get('error') or row.get('note')})" if row["status"] != "ok" else ""), flush=True)
        self.write()
        return row


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------
# Environment and data
# ----------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    """torch, CUDA, cuDNN, the device; the torch 2.9 conv3d AMP warning when it applies."""
    from kaggle_utils.device import CONV3D_AMP_WARNING, slow_conv3d_amp, warn_slow_conv3d_amp

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": cudnn, "device": str(device), "cpu_count": os.cpu_count(),
                           "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=props.total_memory / 2**30, bf16=torch.cuda.is_bf16_supported())
    else:
        env["device_name"] = "cpu"
    if Path("/dev/shm").is_dir():  # DataLoader workers pass batches through it (KAGGLE_IMAGE.md: workers die when full)
        env["dev_shm_gib"] = shutil.disk_usage("/dev/shm").total / 2**30
    env["slow_conv3d_amp"] = slow_conv3d_amp(torch.__version__, cudnn)
    if warn_slow_conv3d_amp(device, True):
        env["warning"] = CONV3D_AMP_WARNING.format(version=torch.__version__, cudnn=cudnn)
        print("WARNING: " + env["warning"], flush=True)
    return env


def make_data(root: Path, n: int, size: int) -> Path:
    """A competition-layout folder of ``n`` synthetic ``size^3`` training volumes (uncompressed TIFFs)."""
    from kaggle_utils.data import write_volume
    from kaggle_utils.synthetic import make_volume

    for sub in ("train_images", "train_labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = ["id,scroll_id"]
    for i in range(n):
        image, label = make_volume((size,) * 3, seed=i)
        write_volume(root / "train_images" / f"{i + 1}.tif", image, compression=None)
        write_volume(root / "train_labels" / f"{i + 1}.tif", label, compression=None)
        rows.append(f"{i + 1},{34117 + i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def predict_input(size: int) -> np.ndarray:
    """A normalized ``float32 (size,)*3`` volume: a synthetic ``size/2`` volume tiled 2x2x2."""
    from kaggle_utils.data import normalize_intensity
    from kaggle_utils.synthetic import make_volume

    half, _ = make_volume((size // 2,) * 3, seed=7)
    return normalize_intensity(np.tile(half, (2, 2, 2)))


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def kaggle_presets() -> list[str]:
    """The shipped Kaggle presets, the recommended one (``kaggle-t4-resenc-m``) first."""
    names = [n for n in shipped_configs() if n.startswith("kaggle-t4")]
    return sorted(names, key=lambda n: (n != "kaggle-t4-resenc-m", n))


def preset_config(name: str, quick: bool, **train: Any) -> Any:
    """The preset's TrainConfig with ``train.amp`` fp16. ``quick`` (the CPU smoke test of this script):
    32^3 patches, batch 2, full precision (CPU autocast is slow), no loader workers, and a small
    network of the same family (3-stage nnU-Net, or the resnet18 smp U-Net with a thin decoder)."""
    from kaggle_utils.config import from_dict, to_dict
    from kaggle_utils.train import TrainConfig, load_train_config

    data = to_dict(load_train_config(name))
    data["train"].update(amp="fp16", check_labels=False, **train)
    if quick:
        data["sampler"]["patch_size"] = data["validation"]["patch_size"] = [32, 32, 32]
        data["train"].update(batch_size=2, num_workers=0, amp="off")
        data["inference"].update(patch_size=[32, 32, 32], batch_size=2)
        m = data["model"]
        if m.get("features_per_stage"):
            m.update(n_stages=3, features_per_stage=[4, 8, 8], strides=[1, 2, 2], n_blocks_per_stage=[1, 1, 1],
                     n_conv_per_stage_decoder=[1, 1])
        else:
            m.update(encoder="resnet18", decoder_channels=[16, 16, 8, 8, 4])
    return from_dict(TrainConfig, data)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def train_step(name: str, data_dir: Path, device: torch.device, channels_last: bool, sizes: dict, quick: bool) -> dict:
    """``plan.dry_run`` of the preset at its patch and batch, fp16, with/without channels_last."""
    from kaggle_utils.plan import dry_run

    cfg = preset_config(name, quick, channels_last=channels_last)
    note = None
    try:
        report = dry_run(cfg, data_dir, fold="all", device=device, steps=sizes["steps"], warmup=sizes["warmup"],
                         config_name=name)
    except RuntimeError as exc:  # e.g. workers killed by a full /dev/shm: measure the step without them
        if "DataLoader worker" not in str(exc) or cfg.train.num_workers == 0:
            raise
        note = f"loader workers failed ({str(exc)[:200]}); measured with num_workers 0"
        cfg = preset_config(name, quick, channels_last=channels_last, num_workers=0)
        report = dry_run(cfg, data_dir, fold="all", device=device, steps=sizes["steps"], warmup=sizes["warmup"],
                         config_name=name)
    print("\n".join(report.lines()), flush=True)
    return {"preset": name, "channels_last": channels_last, "patch": list(report.patch_size),
            "batch": report.batch_size, "amp_dtype": report.amp_dtype, "step_s": report.step_s,
            "wait_share": report.wait_share, "peak_gib": report.peak_memory_bytes / 2**30,
            "memory_kind": report.memory_kind, "tflops": report.achieved_tflops, "step_flops": report.step_flops,
            "loss": report.loss, "step_times": report.step_times, "num_workers": cfg.train.num_workers,
            "note": note}


def fitted_model(name: str, data_dir: Path, device: torch.device, sizes: dict, quick: bool) -> tuple[Any, Any]:
    """``(model, cfg)``: the preset's network after ``fit_steps`` real training steps (fp16) on the data."""
    import kaggle_utils.plan as plan
    from kaggle_utils.train.dist import _Dist
    from kaggle_utils.train.setup import _set_up

    cfg = preset_config(name, quick)
    dist = _Dist(device)
    state = _set_up(cfg, data_dir, None, "all", dist, None, time.monotonic(), False)  # type: ignore[arg-type]
    plan._timed_steps(state, sizes["fit_steps"])
    model = state.model  # not the EMA: after a few dozen steps it is still almost the initial network
    del state
    return model.eval(), cfg


def predict_tta(model: Any, cfg: Any, volume: np.ndarray, device: torch.device) -> dict:
    """One volume through ``inference.predict_volume`` with the preset's settings and 8x flip TTA."""
    from kaggle_utils.inference import predict_volume
    from kaggle_utils.models import model_divisor
    from kaggle_utils.plan import forward_cost, window_count

    settings = dataclasses.replace(cfg.inference, tta="flips")
    z, y, x = settings.patch_size  # warm-up (cuDNN autotuning): two windows, i.e. full window batches
    predict_volume(model, volume[: z + z // 2, :y, :x], dataclasses.replace(settings, tta="none"), device,
                   pad_multiple=model_divisor(cfg.model))
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    prob = predict_volume(model, volume, settings, device, pad_multiple=model_divisor(cfg.model))
    _sync(device)
    seconds = time.perf_counter() - t0
    windows = window_count(volume.shape, settings.patch_size, settings.overlap, model_divisor(cfg.model))
    flops = forward_cost(cfg.model, settings.patch_size) * windows * 8
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"shape": list(volume.shape), "window": list(settings.patch_size), "overlap": settings.overlap,
            "window_batch": settings.batch_size, "windows": windows, "passes": windows * 8, "predict_s": seconds,
            "peak_gib": peak, "tflops": flops / seconds / 1e12, "amp": settings.amp,
            "prob_mean": float(prob.mean())}


def agreement(model: Any, cfg: Any, volume: np.ndarray, device: torch.device) -> dict:
    """fp16 (``amp auto``/``fp16``) vs fp32 (``amp off``, TF32 off) probabilities of the same model and
    volume, no TTA."""
    from kaggle_utils.device import resolve_amp_dtype
    from kaggle_utils.inference import predict_volume
    from kaggle_utils.models import model_divisor

    base = dataclasses.replace(cfg.inference, tta="none")
    half_amp = "auto" if device.type == "cuda" else "fp16"  # CPU: bfloat16, what fp16 means there
    div = model_divisor(cfg.model)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # a true float32 reference (a T4 has no TF32 anyway)
    try:
        p32 = predict_volume(model, volume, dataclasses.replace(base, amp="off"), device, pad_multiple=div)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    p16 = predict_volume(model, volume, dataclasses.replace(base, amp=half_amp), device, pad_multiple=div)
    diff = np.abs(p16 - p32)
    return {"half_dtype": str(resolve_amp_dtype(half_amp, device)), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "flip_share": float(np.mean((p16 > 0.5) != (p32 > 0.5))),
            "near_threshold_share": float(np.mean(np.abs(p32 - 0.5) < 0.01)),
            "fg_share_fp32": float(np.mean(p32 > 0.5))}


def ddp_step(name: str, data_dir: Path, device: torch.device, out: Path, quick: bool) -> dict:
    """``torchrun --nproc_per_node 2 -m kaggle_utils train --dry-run`` of the preset (2 GPUs, NCCL)."""
    cfg = preset_config(name, quick)
    from kaggle_utils.config import save_config

    path = out / "ddp_config.yaml"
    save_config(cfg, path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "kaggle_utils", "train", "--config", str(path), "--fold", "all", "--data-dir", str(data_dir),
           "--out", str(out / "ddp"), "--dry-run", "--dry-run-steps", "5", "--no-progress"]
    if device.type == "cpu":
        cmd += ["--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr[-1500:]}")
    rep = json.loads((out / "ddp" / "dry_run.json").read_text())
    return {"preset": name, "world": rep["world"], "step_s": rep["step_s"], "wait_share": rep["wait_share"],
            "peak_gib": rep["peak_memory_bytes"] / 2**30, "tflops_per_rank": rep["achieved_tflops"]}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

# rough seconds per measurement on one H200-class GPU (first cuDNN autotuning included); quick: CPU smoke
ESTIMATES = {"train": 35.0, "fit": 25.0, "predict": 45.0, "agree": 30.0, "ddp": 90.0}


def run_all(args: argparse.Namespace, rec: Recorder, device: torch.device) -> None:
    """Data, then per preset: train steps (without, then with channels_last); predict + agreement of the
    first preset early (the most wanted numbers), the other presets' predictions after; DDP last."""
    sizes = QUICK if args.quick else FULL
    scale = 0.1 if args.quick else 1.0
    work = Path(tempfile.mkdtemp(prefix="ku-gpu-"))  # not /dev/shm: the loader workers need it
    data_dir = make_data(work / "data", sizes["n_volumes"], sizes["volume"])
    volume = predict_input(sizes["predict_volume"])
    presets = args.presets or kaggle_presets()

    def predict_block(name: str) -> None:
        held: dict[str, Any] = {}

        def fit() -> dict:
            held["model"], held["cfg"] = fitted_model(name, data_dir, device, sizes, args.quick)
            return {"preset": name, "fit_steps": sizes["fit_steps"]}

        if rec.run(f"{name}: fit {sizes['fit_steps']} steps", ESTIMATES["fit"] * scale, fit)["status"] != "ok":
            return
        rec.run(f"{name}: predict {volume.shape[0]}^3 x8 TTA", ESTIMATES["predict"] * scale,
                lambda: {"preset": name, **predict_tta(held["model"], held["cfg"], volume, device)})
        rec.run(f"{name}: fp16 vs fp32", ESTIMATES["agree"] * scale,
                lambda: {"preset": name, **agreement(held["model"], held["cfg"], volume, device)})
        held.clear()

    for i, name in enumerate(presets):
        for cl in (False, True):
            rec.run(f"{name}: train step{' channels_last' if cl else ''}", ESTIMATES["train"] * scale,
                    lambda name=name, cl=cl: train_step(name, data_dir, device, cl, sizes, args.quick))
        if i == 0:
            predict_block(name)
    for name in presets[1:]:
        predict_block(name)
    two_gpus = device.type == "cuda" and torch.cuda.device_count() >= 2
    if two_gpus or args.ddp_cpu:
        rec.run(f"{presets[0]}: DDP 2 processes", ESTIMATES["ddp"] * scale,
                lambda: ddp_step(presets[0], data_dir, device, work, args.quick))
    else:
        rec.data["measurements"].append({"name": f"{presets[0]}: DDP 2 processes", "status": "skipped",
                                         "note": f"needs 2 GPUs; {rec.data['env'].get('gpu_count', 0)} visible"})
        rec.write()


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def table(data: dict) -> str:
    """The measurements as a Markdown table (what BENCHMARKS.md records)."""
    env = data["env"]
    lines = [f"device {env.get('device_name')} | torch {env.get('torch')} | CUDA {env.get('cuda')} | "
             f"cuDNN {env.get('cudnn')} | {env.get('cpu_count')} CPUs | GPUs {env.get('gpu_count')}"]
    if env.get("warning"):
        lines.append("WARNING: " + env["warning"])
    lines += ["", "| measurement | status | s/step, predict s or wall s | wait share | peak GiB | TFLOP/s | other |",
              "|---|---|---|---|---|---|---|"]
    for m in data["measurements"]:
        if m["status"] != "ok":
            lines.append(f"| {m['name']} | {m['status']} | | | | | {m.get('error') or m.get('note', '')} |")
            continue
        main = m.get("step_s", m.get("predict_s", m.get("wall_s")))
        other = ""
        if "flip_share" in m:
            other = (f"max abs diff {m['max_abs_diff']:.2e}, flips {100 * m['flip_share']:.4f} %, within 0.01 of 0.5 "
                     f"{100 * m['near_threshold_share']:.3f} % ({m['half_dtype']})")
        elif "passes" in m:
            other = f"{m['windows']} windows x 8 = {m['passes']} passes of {'x'.join(map(str, m['window']))}"
        elif "batch" in m:
            other = f"patch {'x'.join(map(str, m['patch']))} batch {m['batch']} {m['amp_dtype']}"
        lines.append(f"| {m['name']} | ok | {_fmt(main)} | {_fmt(m.get('wait_share'), '.0%')} | "
                     f"{_fmt(m.get('peak_gib'), '.2f')} | {_fmt(m.get('tflops') or m.get('tflops_per_rank'), '.1f')} "
                     f"| {other} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke test of this script)")
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help=f"folder for {RESULTS_NAME} and table.md")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting measurements after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke test on a CPU)")
    p.add_argument("--presets", nargs="*", default=None, help="config names (default: every kaggle-t4* preset)")
    p.add_argument("--ddp-cpu", action="store_true", help="also run the 2-process DDP dry run on the CPU (gloo)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    rec = Recorder(args.out, args.budget_s)
    rec.data["args"] = {k: str(v) for k, v in vars(args).items()}
    rec.data["env"] = environment(device)
    rec.write()
    try:
        run_all(args, rec, device)
    except Exception as exc:  # noqa: BLE001 - the data set-up failed: keep what was recorded
        rec.data["fatal"] = f"{type(exc).__name__}: {exc}"
        rec.data["fatal_traceback"] = traceback.format_exc()[-3000:]
        rec.write()
        print(f"fatal: {rec.data['fatal']}", file=sys.stderr)
    text = table(rec.data)
    (args.out / "table.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    failed = [m["name"] for m in rec.data["measurements"] if m["status"] == "error"]
    return 1 if failed or "fatal" in rec.data else 0


if __name__ == "__main__":
    sys.exit(main())
