"""README figures of `diagnose`: the out-of-fold predictions of the two runs of benchmarks/collapse.py.

Run benchmarks/collapse.py --out DIR first, then:
    PYTHONPATH=. .venv/bin/python benchmarks/diagnose_examples.py --collapse-out DIR
writes docs/img/diagnose_collapsed.png (seed-v2 run) and docs/img/diagnose_healthy.png (fixed run) and prints
both verdicts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kaggle_utils.diagnostics import diagnose

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--collapse-out", type=Path, required=True, help="--out folder of benchmarks/collapse.py")
    ap.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    args = ap.parse_args()
    for run, name in (("seed-v2", "diagnose_collapsed.png"), ("fixed", "diagnose_healthy.png")):
        verdict, rows = diagnose(args.collapse_out / run / "oof", args.collapse_out / "data", args.img_dir / name)
        print(f"{run:8} {verdict}")


if __name__ == "__main__":
    main()
