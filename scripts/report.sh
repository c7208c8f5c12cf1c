#!/usr/bin/env bash
# `make report`: execute both notebooks headless (papermill) on a small synthetic set and render them to HTML.
# Usage: bash scripts/report.sh PYTHON [OUT_DIR]
set -euo pipefail
PY=${1:-python3}
OUT=${2:-report}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
$PY -m kaggle_utils synth --out "$OUT/data" --n-train 6 --n-test 2 --size 64 --n-scrolls 3 --seed 0
$PY -m papermill notebooks/train.ipynb "$OUT/train.ipynb" --cwd . \
    -p DATA_DIR "$OUT/data" -p CONFIG smoke-cpu -p FOLD 0 -p OUT_DIR "$OUT/run" -p SMOKE True \
    -p INPUT_DIR "$OUT/input"
$PY -m papermill notebooks/submit.ipynb "$OUT/submit.ipynb" --cwd . \
    -p DATA_DIR "$OUT/data" -y "CHECKPOINTS: ['$OUT/run/fold0/best.pt']" -p OUT "$OUT/submission.zip" -p DEVICE cpu -p REPORT_PNG "$OUT/submission_report.png" \
    -p INPUT_DIR "$OUT/input"
$PY -m jupyter nbconvert --to html "$OUT/train.ipynb" "$OUT/submit.ipynb" --output-dir "$OUT"
# the figures must be in the rendered notebooks (a backend switch inside the kernel once left them empty)
for nb in "$OUT/train.ipynb" "$OUT/submit.ipynb"; do
    n=$(grep -c '"image/png"' "$nb" || true)
    [ "$n" -gt 0 ] || { echo "report: $nb has no figures" >&2; exit 1; }
    echo "report: $nb: $n figure(s)"
done
echo "report: $OUT/train.html $OUT/submit.html"
