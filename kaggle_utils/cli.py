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
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]


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


def _run_synth(args: argparse.Namespace) -> int:
    from .synthetic import generate_dataset, save_preview

    root = generate_dataset(
        args.out, n_train=args.n_train, n_test=args.n_test, size=args.size,
        n_scrolls=args.n_scrolls, seed=args.seed,
    )
    print(f"wrote synthetic competition data to {root}")
    if args.preview is not None:
        save_preview(root, args.preview)
        print(f"wrote preview {args.preview}")
    return 0


# ----------------------------------------------------------------------------------------------
# check-data
# ----------------------------------------------------------------------------------------------


def _args_check_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="competition-layout folder (train.csv, train_images/, ...)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_check_data(args: argparse.Namespace) -> int:
    from .data import check_data

    rows = check_data(args.data_dir)
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
    p.add_argument("pred", type=Path, help="submission.zip or folder of {id}.tif / {id}.npy predictions")
    p.add_argument("--data-dir", type=Path, default=None, help="competition-layout folder (labels of train ids are used)")
    p.add_argument("--out", type=Path, default=Path("report.png"), help="report PNG to write")


def _run_diagnose(args: argparse.Namespace) -> int:
    from .diagnostics import diagnose

    verdict, rows = diagnose(args.pred, args.data_dir, args.out)
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
    p.add_argument("--workers", type=int, default=1, help="processes scoring volumes in parallel")
    p.add_argument("--backend", choices=("ours", "official"), default="ours",
                   help="'ours' (fast, same numbers) or the official topometrics package")
    p.add_argument("--ids", nargs="+", default=None, help="score only these volume ids")


def _run_score(args: argparse.Namespace) -> int:
    from .metrics import score_dataset

    try:
        result = score_dataset(args.pred, args.gt, ids=args.ids, workers=args.workers,
                               progress=not args.json, backend=args.backend)
    except ValueError as exc:  # DataError is caught by main(); other user errors here
        from .data import DataError

        if isinstance(exc, DataError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
# registry
# ----------------------------------------------------------------------------------------------

_Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: list[_Command] = [
    ("synth", "write a synthetic dataset in the competition layout", _args_synth, _run_synth),
    ("check-data", "validate a competition-layout folder and report label shares", _args_check_data, _run_check_data),
    ("diagnose", "per-volume foreground shares, collapse verdict and a report PNG", _args_diagnose, _run_diagnose),
    ("score", "competition score of predictions against labels (per volume and mean)", _args_score, _run_score),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kaggle_utils",
        description="Vesuvius Challenge - Surface Detection toolkit: data, training, inference, scoring.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
