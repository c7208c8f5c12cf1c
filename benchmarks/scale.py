"""At the competition's size: the real geometry on one machine, stage by stage (issue 22).

Stages (each timed, with the peak memory of the whole process tree and the disk it leaves):

1. **build** a synthetic competition folder at real geometry: ``--n-320`` volumes of 320³, ``--n-256`` of
   256³ and ``--n-384`` of 384³ (LZW TIFFs, six scrolls, ``train.csv``/``test.csv``, ``--n-test`` test ids).
   Generating a 320³ volume takes 10–45 s here, so ``--n-base`` distinct ones are generated
   (``kaggle_utils.synthetic.make_volume``) and every id is a hard link to one of them: throughput and
   memory see 100+ distinct files; disk is counted per id as the real set would have it.
2. **prepare**: ``kaggle_utils.prepare.prepare`` (decode once into the memory-mapped cache).
3. **loader**: two processes like torchrun's ranks, each with the project's ``PatchDataset`` +
   ``make_loader`` (kaggle-t4's sampler settings, ``--patch``³ patches, batch 2, no CPU augmentation:
   it runs on the GPU), ``--workers-list`` DataLoader workers per rank, reading the LZW TIFFs (an LRU of
   ``--lzw-cache-gib`` per worker) and the prepared cache. Patches/s overall and sustained (after each
   rank's first batch), and CPU seconds per patch (all ranks and workers, from ``getrusage``).
4. **validate + OOF**: ``train.validate_volumes`` and ``train``'s out-of-fold pass (``_write_oof``,
   compact uint8 files) with a small network on the CPU over ``--n-val`` volumes of 320³.
5. **predict**: ``predict.predict_dataset`` over the ``--n-test`` test volumes with the same network.

Memory: a thread samples RSS and PSS (``psutil``) of this process and all its descendants every
``--interval`` s; the table shows the peak of the sums. RSS counts pages of memory-mapped files in
every process that maps them (page cache, reclaimable); PSS shares them out.

Then it projects each stage to the competition (786 volumes: 738 × 320³, 47 × 256³, one 384³) by the
voxel ratio, and the loader to Kaggle's T4×2 box (4 vCPUs) from the CPU seconds per patch.

Run: ``PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/scale.py --work /tmp/ku_scale`` (about 30 min
on 2 cores; ``--quick``: tiny sizes, about a minute). ``--checkpoint RUN/fold0/best.pt`` uses a trained
network for stages 4–5 (realistic out-of-fold files); otherwise a random small one.
Results: BENCHMARKS.md, "At the competition's size".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9
MIB = 2**20
SCROLLS = ("34117", "35360", "26010", "26002", "44430", "53997")
#: the competition's training set: 738 volumes of 320³, 47 of 256³, one of 384³
REAL_SHAPES = {320: 738, 256: 47, 384: 1}


# ----------------------------------------------------------------------------------------------
# Measuring: the process tree's memory, wall time, CPU of finished children
# ----------------------------------------------------------------------------------------------


class TreeMemory(threading.Thread):
    """Peak summed RSS and PSS (bytes) of this process and all its descendants, sampled in the background."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process()
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        import psutil

        rss = pss = 0
        procs = [self.root] + self.root.children(recursive=True)
        for p in procs:
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self.join()
        self.sample()


@dataclass
class Stage:
    """One row of the results table."""

    name: str
    wall_s: float = 0.0
    peak_rss: int = 0
    peak_pss: int = 0
    procs: int = 0
    cpu_s: float = 0.0
    disk: int = 0
    extra: dict = field(default_factory=dict)


def _own_cpu() -> float:
    """CPU seconds of this process (all threads) and its finished, reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measured(name: str, fn, interval: float, *args, **kwargs) -> tuple[Stage, object]:
    """Run ``fn`` under a :class:`TreeMemory`; its :class:`Stage` (disk left for the caller) and result."""
    t0, cpu0 = time.perf_counter(), _own_cpu()
    with TreeMemory(interval) as mem:
        out = fn(*args, **kwargs)
    st = Stage(name, time.perf_counter() - t0, mem.peak_rss, mem.peak_pss, mem.peak_procs, _own_cpu() - cpu0)
    print(f"[{name}] {st.wall_s:.1f} s ({st.cpu_s:.0f} CPU-s here), peak tree RSS {st.peak_rss / GB:.2f} GB / "
          f"PSS {st.peak_pss / GB:.2f} GB, {st.procs} processes; load {os.getloadavg()[0]:.1f}", flush=True)
    return st, out


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (each inode once: hard links count once)."""
    seen, total = set(), 0
    for p in [path] if path.is_file() else path.rglob("*"):
        if p.is_file():
            s = p.stat()
            if (s.st_dev, s.st_ino) not in seen:
                seen.add((s.st_dev, s.st_ino))
                total += s.st_blocks * 512
    return total


def logical_size(path: Path) -> int:
    """Bytes of all files under ``path`` as if every hard link were its own copy."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# 1. the competition folder
# ----------------------------------------------------------------------------------------------


def _pool_volume(pool: Path, edge: int, k: int) -> tuple[Path, Path]:
    """The ``k``-th generated volume of edge ``edge`` (LZW image + label), generated once."""
    from kaggle_utils.data import write_volume
    from kaggle_utils.synthetic import make_volume, scroll_style

    img, lbl = pool / f"e{edge}_{k}.image.tif", pool / f"e{edge}_{k}.label.tif"
    if not (img.is_file() and lbl.is_file()):
        scroll = SCROLLS[k % len(SCROLLS)]
        image, label = make_volume((edge,) * 3, seed=1000 * edge + k, style=scroll_style(scroll))
        write_volume(lbl, label)
        write_volume(img, image)
    return img, lbl


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_folder(work: Path, sizes: dict[int, int], n_base: int, n_test: int) -> Path:
    """``work/comp``: the competition layout, ids ``{edge}_{i}`` hard-linked to ``n_base`` generated volumes per edge."""
    pool, comp = work / "pool", work / "comp"
    rows, test_rows = [], []
    for edge, n in sizes.items():
        base = [_pool_volume(pool, edge, k) for k in range(min(n_base, n) if n else 0)]
        for i in range(n):
            vid, (img, lbl) = f"v{edge}_{i:04d}", base[i % len(base)]
            _link(img, comp / "train_images" / f"{vid}.tif")
            _link(lbl, comp / "train_labels" / f"{vid}.tif")
            rows.append((vid, SCROLLS[(i * 7 + edge) % len(SCROLLS)]))
    edge0 = max(sizes, key=lambda e: sizes[e])
    for i in range(n_test):
        img, _ = _pool_volume(pool, edge0, i % max(1, min(n_base, sizes[edge0])))
        vid = f"t{edge0}_{i:04d}"
        _link(img, comp / "test_images" / f"{vid}.tif")
        test_rows.append((vid, SCROLLS[i % len(SCROLLS)]))
    for name, rws in (("train.csv", rows), ("test.csv", test_rows)):
        (comp / name).write_text("id,scroll_id\n" + "".join(f"{a},{b}\n" for a, b in rws))
    return comp


# ----------------------------------------------------------------------------------------------
# 3. the loader: two ranks, each with its DataLoader workers
# ----------------------------------------------------------------------------------------------


def _tree_cpu() -> float:
    """CPU seconds of this process and its live children (the rank and its DataLoader workers)."""
    import psutil

    total = 0.0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _one_epoch(comp: str, rank: int, job: dict) -> dict:
    """One loader configuration in this rank: the project's PatchDataset + make_loader as ``train`` builds them."""
    import dataclasses

    from kaggle_utils.data import load_index
    from kaggle_utils.sampling import PatchDataset, make_loader
    from kaggle_utils.train import load_train_config

    cfg = dataclasses.replace(load_train_config("kaggle-t4").sampler, patch_size=(job["patch"],) * 3,
                              patches_per_epoch=job["n"], cache_bytes=job["cache_bytes"], prepared=job["prepared"])
    ds = PatchDataset(load_index(comp, "train"), cfg, seed=rank)
    t0, cpu0 = time.perf_counter(), _tree_cpu()
    loader = make_loader(ds, batch_size=2, num_workers=job["workers"])
    ds.set_epoch(0)
    first, half, n, n_half = None, None, 0, 0
    for image, _label, _meta in loader:
        n += int(image.shape[0])
        first = first or time.perf_counter()
        if half is None and n >= job["n"] // 2:
            half, n_half = time.perf_counter(), n
    t1, cpu = time.perf_counter(), _tree_cpu() - cpu0
    del loader
    return {"rank": rank, "n": n, "t0": t0, "first": first, "half": half, "n_half": n_half, "t1": t1, "cpu": cpu}


def _rank_main(rank: int, comp: str, jobs, results) -> None:
    """A rank process (spawned once, like torchrun's): runs each loader configuration it is sent."""
    import multiprocessing

    import torch

    # a spawned child inherits "spawn" as its default start method; a torchrun rank on Linux (Python <= 3.13)
    # has "fork", so its DataLoader workers fork (no re-import, the dataset shared copy-on-write)
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    results.put({"ready": rank})
    while (job := jobs.get()) is not None:
        results.put(_one_epoch(comp, rank, job))


class Ranks:
    """``n`` spawned rank processes, kept for every loader configuration (start-up paid once)."""

    def __init__(self, comp: Path, n: int = 2):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_rank_main, args=(r, str(comp), self.jobs[r], self.results))
                      for r in range(n)]
        for p in self.procs:
            p.start()
        self._collect()  # ready

    def _collect(self) -> list[dict]:
        """One message per rank; a rank that dies is an error, not a hang."""
        import queue as queue_mod

        rows: list[dict] = []
        while len(rows) < len(self.procs):
            try:
                rows.append(self.results.get(timeout=2.0))
            except queue_mod.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode is not None]
                if dead:
                    self.close()
                    raise RuntimeError(f"a rank process ended (exit codes {dead}); see its traceback above")
        return rows

    def run(self, prepared: Path | None, workers: int, n_patches: int, patch: int, cache_bytes: int) -> dict:
        """Every rank reads ``n_patches / ranks`` patches; rates and CPU seconds per patch."""
        job = {"prepared": None if prepared is None else str(prepared), "workers": workers,
               "n": n_patches // len(self.procs), "patch": patch, "cache_bytes": cache_bytes}
        for q in self.jobs:
            q.put(job)
        rows = self._collect()
        n = sum(r["n"] for r in rows)
        wall = max(r["t1"] for r in rows) - min(r["t0"] for r in rows)
        return {"patches": n, "wall_s": wall, "overall": n / wall,
                # the second half of each rank's patches (start-up and prefetch left out), summed over ranks
                "sustained": sum((r["n"] - r["n_half"]) / max(r["t1"] - r["half"], 1e-9) for r in rows),
                "first_batch_s": max(r["first"] - r["t0"] for r in rows),
                "cpu_per_patch": sum(r["cpu"] for r in rows) / max(n, 1)}

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# ----------------------------------------------------------------------------------------------
# 4-5. validation, out-of-fold write and predict with a small network
# ----------------------------------------------------------------------------------------------


def small_network(work: Path, checkpoint: Path | None, window: int):
    """``(model, TrainConfig, checkpoint path)``: a trained checkpoint, or a random small ResEnc U-Net."""
    import torch

    from kaggle_utils.config import from_dict, to_dict
    from kaggle_utils.models import build_model, load_checkpoint, save_checkpoint
    from kaggle_utils.train import TrainConfig, load_train_config

    over = {"validation.patch_size": [window] * 3, "validation.overlap": 0.25, "validation.batch_size": 2,
            "inference.patch_size": [window] * 3, "inference.overlap": 0.25, "inference.batch_size": 2,
            "inference.tta": "none"}
    if checkpoint is not None:
        model, _, ckpt = load_checkpoint(checkpoint, map_location="cpu")
        cfg = from_dict(TrainConfig, ckpt["config"])
        for key, value in over.items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        cfg = from_dict(TrainConfig, to_dict(cfg))
        return model.eval(), cfg, checkpoint
    cfg = load_train_config("cpu-15min", {**over, "model.features_per_stage": [4, 8, 16, 32, 32]})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    path = save_checkpoint(work / "small.pt", model=model, model_config=to_dict(cfg.model),
                           config=to_dict(cfg), epoch=0)
    return model, cfg, path


def validate_and_oof(comp: Path, prepared: Path | None, model, cfg, n_val: int, out: Path) -> dict:
    """``train.validate_volumes`` then ``train``'s out-of-fold pass over the first ``n_val`` 320³ ids."""
    import torch

    from kaggle_utils.data import load_index
    from kaggle_utils.train import validate_volumes
    from kaggle_utils.train.validation import _write_oof

    index = list(load_index(comp, "train"))
    common = max({r.id.split("_")[0] for r in index}, key=lambda e: sum(r.id.startswith(e + "_") for r in index))
    records = [r for r in index if r.id.startswith(common + "_")][:n_val]  # volumes of the common edge (320)
    source = None
    if prepared is not None:
        from kaggle_utils.prepare import open_prepared

        source = open_prepared(prepared)
    cfg.validation.n_score = n_val
    t0 = time.perf_counter()
    with torch.no_grad():
        summary, _ = validate_volumes(model, records, cfg, torch.device("cpu"), source=source)
        t_val = time.perf_counter() - t0
        oof = _write_oof(model, records, cfg, torch.device("cpu"), out, 0, 1, False, source=source)
    return {"validate_s": t_val, "oof_s": time.perf_counter() - t0 - t_val, "oof_dir": oof,
            "val_score": summary.get("val_score"), "n": len(records)}


def float16_size(oof: Path) -> int:
    """Bytes the same out-of-fold probabilities take as float16 ``.npy`` (written to a sibling folder)."""
    from kaggle_utils.probs import as_probability, find_prob_files, read_probs, write_probs

    out = oof.parent / "oof_float16"
    for f in find_prob_files(oof):
        write_probs(out, f.stem, "0", as_probability(read_probs(f)), fmt="float16")
    return sum(p.stat().st_size for p in out.glob("*.npy"))


def run_predict(comp: Path, ckpt: Path, cfg, out: Path) -> dict:
    from kaggle_utils.predict import predict_dataset

    inf = {"patch_size": list(cfg.inference.patch_size), "overlap": cfg.inference.overlap, "batch_size": 2,
           "tta": "none"}
    rep = predict_dataset([str(ckpt)], comp, out, inference_cfg=inf, device="cpu", progress=False)
    return {"n": rep.n_volumes, "errors": len(rep.errors)}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def real_voxels() -> int:
    return sum(n * e**3 for e, n in REAL_SHAPES.items())


def project(stage: Stage, voxels: int) -> str:
    """CPU time, wall time (at this machine's parallelism) and disk of ``stage`` scaled to the real
    training set by voxel count."""
    f = real_voxels() / max(voxels, 1)
    return f"{stage.cpu_s * f / 60:.0f} CPU-min ({stage.wall_s * f / 60:.0f} min wall here), {stage.disk * f / GB:.1f} GB"


def print_table(stages: list[Stage]) -> None:
    print("\n| stage | wall s | CPU s | peak RSS tree GB | peak PSS tree GB | processes | disk GB | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for s in stages:
        notes = "; ".join(f"{k} {v}" for k, v in s.extra.items())
        print(f"| {s.name} | {s.wall_s:.1f} | {s.cpu_s:.0f} | {s.peak_rss / GB:.2f} | {s.peak_pss / GB:.2f} | {s.procs} | "
              f"{s.disk / GB:.2f} | {notes} |")


def _fmt_rate(r: dict) -> str:
    return (f"{r['patches']} patches, {r['overall']:.1f}/s overall, {r['sustained']:.1f}/s sustained, "
            f"{r['cpu_per_patch'] * 1000:.0f} CPU-ms/patch, first batch {r['first_batch_s']:.1f} s")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ku_scale"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of every stage)")
    ap.add_argument("--n-320", type=int, default=100)
    ap.add_argument("--n-256", type=int, default=3)
    ap.add_argument("--n-384", type=int, default=1)
    ap.add_argument("--n-base", type=int, default=3, help="distinct generated volumes per edge")
    ap.add_argument("--n-test", type=int, default=10)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--patches", type=int, default=1000, help="patches of the main run (prepared, 2 workers)")
    ap.add_argument("--patches-scan", type=int, default=200, help="patches per run of the other prepared-cache runs")
    ap.add_argument("--patches-lzw", type=int, default=80, help="patches per run reading the LZW TIFFs")
    ap.add_argument("--workers-list", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--lzw-cache-gib", type=float, default=0.5, help="LRU cache per worker when reading LZW")
    ap.add_argument("--n-val", type=int, default=3)
    ap.add_argument("--window", type=int, default=128, help="validation / inference window")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--skip", nargs="*", default=[], choices=["loader-lzw", "validate", "predict"])
    ap.add_argument("--labels", default="npy", choices=["npy", "packed", "blosc2", "none"],
                    help="prepare's label storage")
    ap.add_argument("--images", default="npy", choices=["npy", "blosc2"], help="prepare's image storage")
    args = ap.parse_args()
    if args.quick:
        args.n_320, args.n_256, args.n_384, args.n_base, args.n_test = 6, 1, 1, 2, 2
        args.patch, args.patches, args.patches_scan, args.patches_lzw, args.workers_list = 32, 40, 16, 16, [1, 2]
        args.n_val, args.window, args.interval = 1, 32, 0.2
    return args


def _sizes(args: argparse.Namespace) -> dict[int, int]:
    if args.quick:  # edges scaled down 320 -> 64: 256 -> 48, 384 -> 80
        return {64: args.n_320, 48: args.n_256, 80: args.n_384}
    return {320: args.n_320, 256: args.n_256, 384: args.n_384}


def main() -> int:
    from kaggle_utils.prepare import prepare

    args = _args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(args)
    voxels = sum(n * e**3 for e, n in sizes.items())
    print(f"machine: {os.cpu_count()} CPUs; load {os.getloadavg()}; work {work}; sizes {sizes}", flush=True)
    stages: list[Stage] = []

    st, comp = measured("build folder", build_folder, args.interval, work, sizes, args.n_base, args.n_test)
    train_bytes = logical_size(comp / "train_images") + logical_size(comp / "train_labels")
    st.disk = du(work / "pool")
    st.extra = {"ids": sum(sizes.values()), "LZW bytes as the real set would hold them (GB)": f"{train_bytes / GB:.2f}",
                "projected": f"{train_bytes * real_voxels() / voxels / GB:.1f} GB"}
    stages.append(st)

    prep_dir = work / "prepared"
    shutil.rmtree(prep_dir, ignore_errors=True)
    st, rep = measured("prepare", prepare, args.interval, comp, prep_dir, workers=2, progress=False,
                       labels=args.labels, images=args.images)
    st.disk = du(prep_dir)
    st.extra = {"labels": args.labels, "images": args.images, "volumes": len(rep.prepared),
                "projected to 786 volumes": project(st, voxels)}
    stages.append(st)

    cache = int(args.lzw_cache_gib * 2**30)
    runs = [("prepared", w, args.patches if w == 2 else args.patches_scan) for w in args.workers_list]
    if "loader-lzw" not in args.skip:
        runs += [("lzw", w, args.patches_lzw) for w in args.workers_list]
    rates = {}
    ranks = Ranks(comp, 2)
    try:
        for src, w, n in runs:
            st, r = measured(f"loader {src} 2 ranks x {w} workers", ranks.run, args.interval,
                             prep_dir if src == "prepared" else None, w, n, args.patch, cache)
            rates[(src, w)] = r
            st.cpu_s = r["cpu_per_patch"] * r["patches"]
            st.extra = {"rate": _fmt_rate(r)}
            print("   ", _fmt_rate(r), flush=True)
            stages.append(st)
    finally:
        ranks.close()

    if "validate" not in args.skip or "predict" not in args.skip:
        model, cfg, ckpt = small_network(work, args.checkpoint, args.window)
    if "validate" not in args.skip:
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)
        st, v = measured("validate + OOF (CPU)", validate_and_oof, args.interval, comp, prep_dir, model, cfg,
                         args.n_val, out)
        st.disk = du(v["oof_dir"])
        f16 = float16_size(v["oof_dir"])
        st.extra = {"volumes": v["n"], "validate s": f"{v['validate_s']:.0f}", "OOF s": f"{v['oof_s']:.0f}",
                    "OOF MiB/vol uint8": f"{st.disk / v['n'] / MIB:.1f}", "float16": f"{f16 / v['n'] / MIB:.1f}",
                    "val_score": v["val_score"]}
        stages.append(st)
    if "predict" not in args.skip:
        zip_path = work / "submission.zip"
        st, p = measured("predict (CPU)", run_predict, args.interval, comp, ckpt, cfg, zip_path)
        st.disk = zip_path.stat().st_size if zip_path.exists() else 0
        st.extra = {"volumes": p["n"], "errors": p["errors"], "s/volume": f"{st.wall_s / max(p['n'], 1):.1f}"}
        stages.append(st)
    print_table(stages)
    (work / "scale_results.json").write_text(json.dumps(
        {"stages": [s.__dict__ for s in stages], "rates": {f"{k[0]}-{k[1]}": v for k, v in rates.items()},
         "sizes": sizes, "load_end": os.getloadavg()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
