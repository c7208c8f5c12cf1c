#!/usr/bin/env bash
# A stand-in for Kaggle's notebook image (../shared facts, README "Kaggle workflow"): Python 3.12 with the image's
# own torch, numpy, scipy, scikit-image, numba, timm, tifffile, matplotlib, papermill ... and WITHOUT what our wheel
# set brings (imagecodecs, cc3d, edt, smp-3d, ...). The rehearsal test uses it through KU_IMAGE_PYTHON.
# Usage: bash scripts/kaggle_image_env.sh [VENV_DIR] [PYTHON3.12]
# Needs PyPI (about 3 GB of downloads, 7.4 GB on disk: torch for 3.12 is a CUDA build; it runs on the CPU here).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.kaggle-image}
PY=${2:-}
if [ -z "$PY" ]; then
    if command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv root)/versions/3.12.1/bin/python" ]; then
        PY="$(pyenv root)/versions/3.12.1/bin/python"
    else
        PY=$(command -v python3.12 || true)
    fi
fi
[ -n "$PY" ] && [ -x "$PY" ] || { echo "kaggle_image_env: no Python 3.12 found (pass it as the 2nd argument)" >&2; exit 1; }
REQ=ci/kaggle-image-requirements.txt
STAMP="$VENV/.installed-$(sha1sum "$REQ" | cut -c1-12)"
if [ -f "$STAMP" ]; then echo "$VENV/bin/python"; exit 0; fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r "$REQ" >&2
"$VENV/bin/python" -c "import torch, numpy, ipykernel, papermill; print('kaggle image stand-in: torch', torch.__version__, 'numpy', numpy.__version__)" >&2
touch "$STAMP"
echo "$VENV/bin/python"
