#!/usr/bin/env bash
# Build the Kaggle wheel dataset: the kaggle_utils wheel plus the wheels Kaggle's image lacks.
# Usage: bash scripts/build_wheels.sh [PYTHON] [OUT_DIR]
# Upload:  kaggle datasets create -p datasets/kaggle-utils-wheels   (first time)
#          kaggle datasets version -p datasets/kaggle-utils-wheels -m "kaggle_utils $(git describe --always)"
# Install on Kaggle (offline, keeps Kaggle's torch):
#   pip install --no-index --no-deps --find-links /kaggle/input/kaggle-utils-wheels kaggle_utils \
#       segmentation-models-pytorch-3d timm-3d pretrainedmodels efficientnet-pytorch munch connected-components-3d edt
set -euo pipefail
PY=${1:-python3}
OUT=${2:-datasets/kaggle-utils-wheels}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
rm -f "$OUT"/*.whl "$OUT"/*.tar.gz
# Target: Kaggle's image (CPython 3.11 or 3.12, x86_64, manylinux). Pure-Python wheels fit both.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" . 2>&1 | grep -v "is ignored" || true
# Wheels that Kaggle's image lacks. smp-3d pins timm==0.9.7 but works with Kaggle's timm 1.x: --no-deps.
# pretrainedmodels and efficientnet-pytorch ship source archives only: build them into wheels.
"$PY" -m pip wheel -q --no-deps -w "$OUT" \
    segmentation-models-pytorch-3d==1.0.2 timm-3d==1.0.1 pretrainedmodels==0.7.4 efficientnet-pytorch==0.7.1 munch \
    connected-components-3d edt 2>&1 | grep -v "is ignored" || true
n=$(ls "$OUT"/*.whl | wc -l)
test "$n" -ge 8 || { echo "expected 8 wheels in $OUT, found $n" >&2; exit 1; }
ls -1 "$OUT"/*.whl
