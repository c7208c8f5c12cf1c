"""Command line: ``python -m kaggle_utils <command> [--help]``.

Each command is a pair of functions here: ``_args_<name>(parser)`` declares its arguments and
``_run_<name>(args) -> int`` maps them onto the library call. Heavy imports (torch) happen inside
the run functions so ``--help`` and the data commands start fast. Library errors that describe bad
input (:class:`~kaggle_utils.data.DataError`, :class:`~kaggle_utils.config.ConfigError`) are
printed as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ConfigError, shipped_configs

__all__ = ["main", "build_parser"]


def _add_set(p: argparse.ArgumentParser, example: str, relative_to: str) -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, values parsed as YAML."""
    p.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key (repeatable), the value parsed as YAML, e.g. --set {example}; "
                        f"key paths {relative_to}, checked like the file's")


def _split_sections(overrides: dict, sections: tuple[str, ...]) -> dict[str, dict]:
    """``{"inference.batch_size": 4, "postprocess.threshold": .4}`` -> one dict per section, the
    section prefix removed; a key of no listed section is a ConfigError naming it."""
    out: dict[str, dict] = {s: {} for s in sections}
    for key, value in overrides.items():
        section, _, rest = key.partition(".")
        if section not in out or not rest:
            raise ConfigError(f"--set {key}: key must start with one of {', '.join(s + '.' for s in sections)}")
        out[section][rest] = value
    return out


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` of every long command (bars are also off where nobody watches: kaggle_utils.progress)."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn only on a terminal or in an interactive notebook anyway; "
                        "KAGGLE_UTILS_PROGRESS=0/1 turns them off/on everywhere)")


# ----------------------------------------------------------------------------------------------
# synth
# ----------------------------------------------------------------------------------------------


def _args_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder (competition layout)")
    p.add_argument("--n-train", type=int, default=8, help="number of training volumes")
    p.add_argument("--n-test", type=int, default=2, help="number of test volumes")
    p.add_argument("--size", type=int, default=128, help="edge length S of most volumes (some are 0.8*S)")
    p.add_argument("--n-scrolls", type=int, default=4, help="number of distinct scroll_ids")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--preview", type=Path, default=None, help="also save a slice montage PNG here")
    p.add_argument("--no-test-labels", action="store_true",
                   help="do not write test_labels/ (the hidden answers used to score a synthetic submission)")
    _add_no_progress(p)


def _run_synth(args: argparse.Namespace) -> int:
    from .synthetic import generate_dataset, save_preview

    try:
        root = generate_dataset(
            args.out, n_train=args.n_train, n_test=args.n_test, size=args.size,
            n_scrolls=args.n_scrolls, seed=args.seed, test_labels=not args.no_test_labels,
            progress=not args.no_progress,
        )
        print(f"wrote synthetic competition data to {root}")
        if args.preview is not None:
            save_preview(root, args.preview)
            print(f"wrote preview {args.preview}")
    except OSError as exc:  # read-only or full disk, a file where a folder should be, ...
        print(f"error: synth: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # argument checks of generate_dataset (DataError is caught by main())
        from .data import DataError

        if isinstance(exc, DataError):
            raise
        print(f"error: synth: {exc}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------


def _part_arg(value: str) -> tuple[int, int]:
    """``--part K/N``."""
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not K/N, e.g. 1/2") from None
    return k, n


def _args_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help="competition-layout folder with train.csv, train_images/, train_labels/ (default: Kaggle mount)")
    p.add_argument("--out", required=True, type=Path, help="cache folder to write (resumes what is there)")
    p.add_argument("--labels", choices=("npy", "packed", "blosc2", "none"), default="npy",
                   help="label storage: npy (1 byte/voxel), packed (2 bits/voxel, a quarter), blosc2 (compressed, "
                        "~0.5 MB per 320^3 volume; needs blosc2, in Kaggle's image), none (images only; "
                        "training decodes labels from the TIFFs)")
    p.add_argument("--images", choices=("npy", "blosc2"), default="npy",
                   help="image storage: npy (memory-mapped, fastest) or blosc2 (compressed; saves what the "
                        "scans' noise allows: measure on a few volumes first)")
    p.add_argument("--ids", nargs="+", default=None, help="prepare only these ids")
    p.add_argument("--folds", nargs="+", type=int, default=None,
                   help="prepare only the volumes of these scroll-grouped folds (of --n-folds)")
    p.add_argument("--n-folds", type=int, default=5, help="folds for --folds (train.n_folds)")
    p.add_argument("--part", type=_part_arg, default=None, metavar="K/N",
                   help="every N-th volume from the K-th (1-based): split the cache over N datasets")
    p.add_argument("--surface-points", type=int, default=50_000, help="surface index size (sampler.surface_points)")
    p.add_argument("--workers", type=_workers_arg, default=max(1, min(4, os.cpu_count() or 1)),
                   help="volumes decoded in parallel (threads)")
    _add_no_progress(p)


def _run_prepare(args: argparse.Namespace) -> int:
    from .data import find_data_root
    from .outputs import check_output
    from .prepare import prepare

    check_output(args.out, "dir", what="--out")  # read-only, a file in the way, a full disk: before any decode
    try:
        report = prepare(find_data_root(args.data_dir), args.out, ids=args.ids, folds=args.folds,
                         n_folds=args.n_folds, part=args.part, labels=args.labels, images=args.images,
                         surface_points=args.surface_points, workers=args.workers, progress=not args.no_progress)
    except OSError as exc:  # full or read-only disk
        print(f"error: prepare: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(report)
    return 0


# ----------------------------------------------------------------------------------------------
# check-data
# ----------------------------------------------------------------------------------------------


def _args_check_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="competition-layout folder (train.csv, train_images/, ...)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_no_progress(p)


def _run_check_data(args: argparse.Namespace) -> int:
    from .data import check_data

    rows = check_data(args.data_dir, progress=not args.no_progress)
    n_bad = sum(bool(r["problems"]) for r in rows)
    if args.json:
        print(json.dumps({"volumes": rows, "n_problems": n_bad}, indent=1, default=str))
        return 1 if n_bad else 0
    print(f"{'split':5} {'id':>14} {'scroll':>7} {'shape':>16} {'dtype':>6} {'bg%':>6} {'surf%':>6} {'ign%':>6}  problems")
    for r in rows:
        shares = [f"{100 * r[k]:6.1f}" if r[k] is not None else f"{'-':>6}" for k in ("share0", "share1", "share2")]
        shape = "x".join(map(str, r["shape"])) if r["shape"] else "-"
        print(f"{r['split']:5} {r['id']:>14} {r['scroll_id']:>7} {shape:>16} {str(r['dtype'] or '-'):>6} "
              f"{' '.join(shares)}  {'; '.join(r['problems']) or 'ok'}")
    labelled = [r for r in rows if r["share1"] is not None]
    if labelled:
        for k, name in (("share0", "background"), ("share1", "surface"), ("share2", "ignore")):
            vals = [100 * r[k] for r in labelled]
            print(f"{name:>10} share over {len(vals)} labelled volumes: "
                  f"min {min(vals):.1f}%  mean {sum(vals) / len(vals):.1f}%  max {max(vals):.1f}%")
    print(f"{len(rows)} volume(s), {n_bad} with problems")
    return 1 if n_bad else 0


# ----------------------------------------------------------------------------------------------
# diagnose
# ----------------------------------------------------------------------------------------------


def _args_diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("pred", type=Path, help="submission.zip or folder of {id}.tif predictions or {id}.npz / {id}.npy probabilities")
    p.add_argument("--data-dir", type=Path, default=None, help="competition-layout folder (labels of train ids are used)")
    p.add_argument("--out", type=Path, default=Path("report.png"), help="report PNG to write")
    p.add_argument("--postprocess", default=None, metavar="FILE",
                   help="post-processing YAML whose threshold (or hysteresis) turns probabilities into masks, "
                        "e.g. tune's output or a training config (default: threshold 0.5)")


def _run_diagnose(args: argparse.Namespace) -> int:
    from .diagnostics import diagnose

    verdict, rows = diagnose(args.pred, args.data_dir, args.out, postprocess=args.postprocess)
    print(f"{'id':>14} {'fg%':>8} {'label%':>8} {'prob std':>9}")
    for r in rows:
        lab = f"{100 * r['label_fg']:8.2f}" if r["label_fg"] is not None else f"{'-':>8}"
        ps = f"{r['prob_std']:9.4f}" if r["prob_std"] is not None else f"{'-':>9}"
        print(f"{r['id']:>14} {100 * r['fg']:8.2f} {lab} {ps}")
    print(verdict)
    print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------


def _args_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("pred", type=Path, help="predictions: a .tif, a folder of {id}.tif or a submission.zip")
    p.add_argument("gt", type=Path, help="labels: a .tif, a folder of {id}.tif or a competition-layout folder")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--workers", type=_workers_arg, default=1, help="processes scoring volumes in parallel (>= 1)")
    p.add_argument("--backend", choices=("ours", "official"), default="ours",
                   help="'ours' (fast, same numbers) or the official topometrics package")
    p.add_argument("--ids", nargs="+", default=None, help="score only these volume ids")
    _add_no_progress(p)


def _workers_arg(value: str) -> int:
    """``--workers``: a whole number of processes, at least 1 (0 and negatives are refused, not read as 'auto')."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (processes running in parallel), got {n}")
    return n


def _run_score(args: argparse.Namespace) -> int:
    from .metrics import score_dataset

    try:
        result = score_dataset(args.pred, args.gt, ids=args.ids, workers=args.workers,
                               progress=not (args.json or args.no_progress), backend=args.backend)
    except ValueError as exc:  # DataError is caught by main(); other user errors here
        from .data import DataError

        if isinstance(exc, DataError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in result.warnings:  # scored as Kaggle would, but probably not what was meant
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0
    print(f"{'id':>14} {'score':>7} {'topo':>7} {'SD':>7} {'VOI_sc':>7} {'split':>7} {'merge':>7}")
    for vol_id, v in result.volumes.items():
        print(f"{vol_id:>14} {v.score:7.4f} {v.topo_score:7.4f} {v.surface_dice:7.4f} {v.voi_score:7.4f} "
              f"{v.voi_split:7.4f} {v.voi_merge:7.4f}")
    print(f"{'mean':>14} {result.mean:7.4f}   over {len(result.volumes)} volume(s)")
    return 0


# ----------------------------------------------------------------------------------------------
# predict / validate-submission
# ----------------------------------------------------------------------------------------------


def _args_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, nargs="+", type=Path,
                   help="checkpoint file(s); several = ensemble (same normalization required)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="competition-layout folder with test.csv and test_images/ (default: Kaggle mount)")
    p.add_argument("--out", type=Path, default=Path("submission.zip"), help="submission zip to write")
    p.add_argument("--config", default=None,
                   help="inference YAML (InferenceConfig keys, bare or under 'inference:', e.g. a training config "
                        "or a shipped name such as kaggle-t4); default: the checkpoint's")
    p.add_argument("--postprocess", default=None,
                   help="post-processing YAML (e.g. from 'tune', bare or under 'postprocess:'); default: the "
                        "checkpoint's postprocess section")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--save-probs", type=Path, default=None,
                   help="also write per-volume probabilities {id}.npz (uint8) or {id}.npy (float16) + {id}.json here")
    p.add_argument("--probs-format", choices=("uint8", "float16"), default="uint8",
                   help="format of --save-probs: uint8 (compact .npz, p*255 rounded, default) or float16 (.npy)")
    p.add_argument("--tta", choices=("none", "flips", "rot90", "flips+rot90"), default=None,
                   help="TTA preset (overrides the config)")
    p.add_argument("--time-limit-s", dest="time_limit_s", type=float, default=9 * 3600 * 0.9,
                   help="time budget in seconds; TTA passes are dropped when the run would not fit "
                        "(default 29160 = 90%% of 9 h)")
    p.add_argument("--time-limit", dest="time_limit_s", type=float, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # another spelling, as train accepts it
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory budget in GiB (default: 80%% of the free memory); the read-ahead is dropped when "
                        "only that does not fit, and a run that cannot fit stops before any volume")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_set(p, "postprocess.threshold=0.4", "start with inference. (needs --config) or postprocess. (needs --postprocess)")
    _add_no_progress(p)


def _run_predict(args: argparse.Namespace) -> int:
    import logging
    import warnings

    from .config import ConfigError, load_config, parse_overrides
    from .data import find_data_root
    from .inference import InferenceConfig
    from .models import CheckpointError
    from .postprocess import PostprocessConfig
    from .device import DeviceError, resolve_device
    from .predict import Interrupted, PredictError, PredictFailed, PredictWarning, predict_dataset
    from .submission import OutputPathError, SubmissionError

    sets = _split_sections(parse_overrides(args.set), ("inference", "postprocess"))
    for section, flag, value in (("inference", "--config", args.config), ("postprocess", "--postprocess", args.postprocess)):
        if sets[section] and value is None:
            raise ConfigError(f"--set {section}.{next(iter(sets[section]))}: needs {flag} FILE to apply to "
                              f"(a shipped name such as kaggle-t4 is fine)")
    inference_cfg = None
    if args.config is not None:
        inference_cfg = load_config(InferenceConfig, args.config, section="inference", overrides=sets["inference"])
    pp_cfg = (load_config(PostprocessConfig, args.postprocess, section="postprocess", overrides=sets["postprocess"])
              if args.postprocess is not None else None)
    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"predict: device {device}", file=sys.stderr)
    # info lines (e.g. staged masks of an interrupted run reused) on stderr; warnings come via `warnings`
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(lambda record: record.levelno < logging.WARNING)
    pred_log = logging.getLogger("kaggle_utils.predict")
    pred_log.addHandler(handler)
    pred_log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PredictWarning)  # each one is in the report printed below
            report = predict_dataset(
                [str(c) for c in args.checkpoint], find_data_root(args.data_dir), args.out,
                inference_cfg=inference_cfg, postprocess_cfg=pp_cfg, device=device,
                save_probs=args.save_probs, probs_format=args.probs_format, tta=args.tta, time_limit_s=args.time_limit_s,
                progress=not (args.json or args.no_progress), memory_gb=args.memory_gb,
            )
    except PredictFailed as exc:
        for vid, msg in exc.errors.items():
            print(f"error: {vid}: {msg}", file=sys.stderr)
        print(f"error: no test volume could be predicted ({len(exc.errors)} failed); no submission written",
              file=sys.stderr)
        return 1
    except (CheckpointError, PredictError, OutputPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SubmissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"error: {exc}; temp files removed, finished masks kept in {args.out}.parts for a rerun",
              file=sys.stderr)
        return 128 + exc.signum
    finally:
        pred_log.removeHandler(handler)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(report)
    return 0


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="training checkpoint, e.g. RUN_DIR/best.pt")
    p.add_argument("--out", type=Path, default=Path("model.pt"), help="inference file to write (default model.pt)")
    p.add_argument("--fp16", action="store_true", help="store float16 weights (about half the size)")


def _run_export(args: argparse.Namespace) -> int:
    from .models import CheckpointError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, fp16=args.fp16)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mb = 1024 * 1024
    print(f"wrote {out} ({out.stat().st_size / mb:.1f} MiB, {'float16' if args.fp16 else 'float32'} weights) "
          f"from {args.checkpoint} ({args.checkpoint.stat().st_size / mb:.1f} MiB)")
    return 0


def _args_validate_submission(p: argparse.ArgumentParser) -> None:
    p.add_argument("zip", type=Path, help="submission.zip to check")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="competition-layout folder with test.csv and test_images/ (default: Kaggle mount)")


def _run_validate_submission(args: argparse.Namespace) -> int:
    from .data import find_data_root
    from .submission import validate_submission

    problems = validate_submission(args.zip, find_data_root(args.data_dir))
    for problem in problems:
        print(problem)
    print(f"{args.zip}: " + (f"{len(problems)} problem(s)" if problems else "valid"))
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="training YAML: a file, or the name of a shipped config without a folder "
                        f"({', '.join(shipped_configs())})")
    p.add_argument("--fold", type=_fold_arg, default=0,
                   help="validation fold; -1 trains every fold in turn (RUN_DIR/fold{k}); 'all' trains on every "
                        "volume with none held out (validation only on validation.ids, if listed)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="competition-layout folder with train.csv (default: the Kaggle mount)")
    p.add_argument("--out", required=True, type=Path, help="run folder (last.pt, best.pt, train.log, metrics, oof/)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt exactly where it stopped")
    p.add_argument("--resume-force", action="store_true",
                   help="--resume even when the config differs from last.pt's in keys that change training "
                        "(e.g. more --epochs stretch the LR schedule); the differing keys are logged")
    p.add_argument("--time-limit-s", dest="time_limit_s", type=float, default=None,
                   help="stop cleanly (checkpoint kept) before this many seconds have passed (train.time_limit_s)")
    p.add_argument("--time-limit", dest="time_limit_s", type=float, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="plan the whole run to end inside S seconds (train.time_budget_s): the LR schedule follows "
                        "the budget's elapsed fraction, and the run ends finished: annealed, last.pt (with a held-out "
                        "fold also validated, best.pt, out-of-fold probabilities; --fold all has none). With --fold -1 "
                        "S covers all folds, an equal share "
                        "each (one log line says so). --time-limit-s is instead a hard stop of a run meant "
                        "to be resumed")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from this checkpoint's weights (train.init_from; same network, any patch size) with "
                        "a new optimizer and schedule, e.g. fine-tune a 128^3 model at 192^3")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--prepared", nargs="+", default=None, metavar="DIR",
                   help="read patches from the cache(s) written by 'prepare' (sampler.prepared): memory-mapped, "
                        "nothing decoded; several folders, e.g. one per attached dataset")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="the run's memory budget in GiB (train.memory_gb; default: 80%% of the free memory)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    _add_no_progress(p)
    _add_set(p, "optim.lr=1e-3 --set sampler.patch_size=[64,64,64]", "as in the YAML (section.key)")
    p.add_argument("--dry-run", action="store_true",
                   help="do not train: build the configured network, time a few real steps at the configured patch, "
                        "batch and precision on --device, print s/step, data-loader wait, peak memory and the "
                        "epochs/patches that fit the time budget; writes RUN_DIR/dry_run.json")
    p.add_argument("--dry-run-steps", type=int, default=5, metavar="N", help="timed steps of --dry-run (after 2 warm-up)")


def _fold_arg(value: str) -> int | str:
    """``--fold``: an integer, or ``all``."""
    if value.strip().lower() == "all":
        return "all"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fold number, -1 or 'all'") from None


def _run_train(args: argparse.Namespace) -> int:
    import os

    from .data import find_data_root
    from .train import check_fold, load_train_config, train, train_folds

    from .config import parse_overrides

    overrides = parse_overrides(args.set)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.prepared is not None:
        overrides["sampler.prepared"] = [str(p) for p in args.prepared]
    if args.memory_gb is not None:
        overrides["train.memory_gb"] = args.memory_gb
    cfg = load_train_config(args.config, overrides or None)
    # train() shows its log lines on stdout itself (rank 0 only), as in a notebook: no handler here
    if args.fold != -1:
        check_fold(args.fold, cfg.train.n_folds)  # ConfigError naming train.n_folds: one line, exit 2
    kwargs = dict(resume=args.resume or args.resume_force, allow_config_change=args.resume_force,
                  time_limit=args.time_limit_s, device=args.device, progress=not args.no_progress,
                  time_budget=args.time_budget, init_from=args.init_from)
    data_dir = find_data_root(args.data_dir)
    if args.dry_run:
        return _dry_run(args, cfg, data_dir)
    if args.fold == -1:
        results = train_folds(cfg, data_dir, args.out, **kwargs)
    else:
        results = [train(cfg, data_dir, args.out, fold=args.fold, **kwargs)]
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, not once per process
        for r in results:
            print(r)
    return 0


# ----------------------------------------------------------------------------------------------
# baseline
# ----------------------------------------------------------------------------------------------


def _args_baseline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["zeros", "otsu"], default="otsu", help="all-zero or Otsu intensity threshold")
    p.add_argument("--data-dir", type=Path, required=True, help="competition-layout folder (test.csv, test_images/)")
    p.add_argument("--out", type=Path, default=Path("baseline.zip"), help="submission zip to write")


def _run_baseline(args: argparse.Namespace) -> int:
    from .baselines import write_baseline_submission
    from .submission import SubmissionError

    try:
        out = write_baseline_submission(args.data_dir, args.out, args.kind)
    except SubmissionError as exc:  # --out a folder or not writable (DataError: main() prints it)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.kind} baseline)")
    return 0


# ----------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------


def _args_tune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probs", required=True, type=Path,
                   help="out-of-fold probabilities: RUN_DIR/oof, RUN_DIR of --fold -1, or predict --save-probs DIR")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="competition-layout folder with train.csv and train_labels/ (default: the Kaggle mount)")
    p.add_argument("--space", type=Path, default=None,
                   help="search-space YAML (SearchSpace keys), or 'winners': the built-in space that also tries each of "
                        "the winners' post-processing steps (tune.WINNERS_SPACE); default: the built-in basic space")
    p.add_argument("--workers", type=_workers_arg, default=1, help="processes scoring candidates in parallel (>= 1)")
    p.add_argument("--out", type=Path, default=Path("best-postprocess.yaml"),
                   help="best post-processing YAML (for predict --postprocess)")
    p.add_argument("--plot", type=Path, default=None,
                   help="also save score vs threshold (overall, per scroll) PNG; scores the best settings at every "
                        "grid threshold on every volume (for halving up to a third more pairs)")
    p.add_argument("--json", type=Path, default=None, help="also write every candidate and the fold guard as JSON")
    p.add_argument("--top", type=int, default=15, help="candidates shown in the table")
    p.add_argument("--seed", type=int, default=0, help="seed of methods random, halving and exhaustive")
    p.add_argument("--method", choices=("coordinate", "random", "halving", "exhaustive"), default=None,
                   help="search method (overrides the space's 'method'); halving: successive halving, "
                        "a fraction of exhaustive's (candidate, volume) pairs")
    _add_no_progress(p)
    _add_set(p, "threshold=[0.3,0.4,0.5] --set base.border=3", "as in the --space YAML (SearchSpace keys)")


def _run_tune(args: argparse.Namespace) -> int:
    from .data import atomic_path, find_data_root
    from .postprocess import save_postprocess
    from .tune import WINNERS_SPACE, load_labels, load_probs, load_search_space, plot_threshold_curves, tune
    from .config import parse_overrides
    from .outputs import check_output

    overrides = parse_overrides(args.set)
    for option, path in (("--out", args.out), ("--plot", args.plot), ("--json", args.json)):
        if path is not None:  # a search may take hours: never lose it to an unwritable output
            check_output(path, "file", what=option)
    if args.space is not None and str(args.space) == "winners":
        space = load_search_space(data=WINNERS_SPACE, overrides=overrides)
    else:
        space = load_search_space(args.space, overrides=overrides)
    if args.method is not None:
        space.method = args.method
    probs = load_probs(args.probs)
    labels = load_labels(find_data_root(args.data_dir), [p.id for p in probs], probs)  # shapes checked first
    result = tune(probs, labels, space, workers=args.workers, seed=args.seed, progress=not args.no_progress,
                  curve=args.plot is not None)
    print(result.format_table(top=args.top))
    save_postprocess(result.best, args.out)
    print(f"wrote {args.out}  (use: predict --postprocess {args.out})")
    if args.plot is not None:
        plot_threshold_curves(result, args.plot)
        print(f"wrote {args.plot}")
    if args.json is not None:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(result.to_json(), indent=1))
        print(f"wrote {args.json}")
    return 0


def _dry_run(args: argparse.Namespace, cfg: Any, data_dir: Path) -> int:
    """``train --dry-run``: :func:`kaggle_utils.plan.dry_run`, printed and written to ``RUN_DIR/dry_run.json`` (rank 0)."""
    import os

    from .data import atomic_path
    from .plan import dry_run

    if args.dry_run_steps < 1:
        raise ConfigError(f"--dry-run-steps: must be >= 1, got {args.dry_run_steps}")
    report = dry_run(cfg, data_dir, fold=0 if args.fold == -1 else args.fold, device=args.device,
                     steps=args.dry_run_steps, config_name=str(args.config), time_budget=args.time_budget)
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(report.lines()))
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "dry_run.json") as tmp:
            Path(tmp).write_text(json.dumps(report.to_json(), indent=1) + "\n")
        print(f"wrote {args.out / 'dry_run.json'}")
    return 0


# ----------------------------------------------------------------------------------------------
# kaggle-setup / kaggle-push
# ----------------------------------------------------------------------------------------------


def _args_kaggle_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", required=True, help="your Kaggle user name (kaggle.com/<user>)")
    p.add_argument("--root", type=Path, default=Path("."), help="repository root (default: the current folder)")


def _run_kaggle_setup(args: argparse.Namespace) -> int:
    from .kaggle_cli import METADATA_FILES, KaggleSetupError, set_user

    try:
        changed = set_user(args.root, args.user)
    except KaggleSetupError as exc:
        print(f"error: kaggle-setup: {exc}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"wrote {path}")
    print(f"{len(changed)} of {len(METADATA_FILES)} metadata file(s) changed; owner {args.user}")
    return 0


def _args_kaggle_push(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="folder with kernel-metadata.json (e.g. . or notebooks/train) or "
                                             "dataset-metadata.json (e.g. datasets/kaggle-utils-wheels)")
    p.add_argument("-m", "--message", default=None, help="dataset: push a new version with this message "
                                                         "(default: create the dataset)")
    p.add_argument("--dir-mode", choices=("skip", "zip", "tar"), default=None, help="dataset: how sub-folders go up")
    p.add_argument("--dry-run", action="store_true", help="check and print the kaggle command, do not run it")


def _run_kaggle_push(args: argparse.Namespace) -> int:
    import shlex
    import shutil
    import subprocess

    from .kaggle_cli import KaggleSetupError, push_command, push_problems

    try:
        problems = push_problems(args.folder)
        cmd = push_command(args.folder, args.message, args.dir_mode)
    except KaggleSetupError as exc:
        print(f"error: kaggle-push: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"error: kaggle-push: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    if shutil.which("kaggle") is None:
        print("error: kaggle-push: the Kaggle CLI is not installed (pip install kaggle; token in ~/.kaggle/kaggle.json)",
              file=sys.stderr)
        return 2
    return subprocess.run(cmd).returncode


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

_Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: list[_Command] = [
    ("synth", "write a synthetic dataset in the competition layout", _args_synth, _run_synth),
    ("prepare", "decode the training volumes once into a memory-mapped cache (sampler.prepared / train --prepared)",
     _args_prepare, _run_prepare),
    ("check-data", "validate a competition-layout folder and report label shares", _args_check_data, _run_check_data),
    ("baseline", "write a trivial baseline submission (all-zero or Otsu threshold)", _args_baseline, _run_baseline),
    ("diagnose", "per-volume foreground shares, collapse verdict and a report PNG", _args_diagnose, _run_diagnose),
    ("score", "competition score of predictions against labels (per volume and mean)", _args_score, _run_score),
    ("predict", "inference + post-processing on every test id -> validated submission.zip", _args_predict, _run_predict),
    ("validate-submission", "check a submission.zip against test.csv and the test images", _args_validate_submission,
     _run_validate_submission),
    ("export", "write the small inference file of a checkpoint (weights, model/inference/postprocess config)",
     _args_export, _run_export),
    ("train", "train one fold (or all with --fold -1) from a YAML config; --resume continues", _args_train, _run_train),
    ("tune", "search post-processing on out-of-fold probabilities -> best-postprocess.yaml", _args_tune, _run_tune),
    ("kaggle-setup", "write your Kaggle user name into the four Kaggle metadata files (replaces 'kaggleuser')",
     _args_kaggle_setup, _run_kaggle_setup),
    ("kaggle-push", "push a kernel or dataset folder with the Kaggle CLI, refused while 'kaggleuser' or a missing "
     "machine_shape is left", _args_kaggle_push, _run_kaggle_push),
]


class _VersionAction(argparse.Action):
    """``--version``: ``kaggle_utils 0.1.0 (commit 1a2b3c4d5e)``; the stamp (a git call) only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .version import version_stamp

        print(f"kaggle_utils {version_stamp()}")
        parser.exit(0)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: <command>: <problem>``, exit 2), as every other error."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.removeprefix("python -m kaggle_utils").strip()
        self.exit(2, f"error: {command + ': ' if command else ''}{message} (--help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m kaggle_utils",
        description="Vesuvius Challenge - Surface Detection toolkit: data, training, inference, scoring.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and git commit, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .device import UnsupportedGPUError
    from .outputs import OutputError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (DataError, ConfigError, OutputError, UnsupportedGPUError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
