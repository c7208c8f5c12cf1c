#!/usr/bin/env bash
# The one-call GPU check of issue 23, run from the repository root on a machine with a GPU:
#
#   OUT=/path/to/results bash scripts/gpu_check.sh          # BUDGET_S (default 420) bounds benchmarks/gpu.py
#
# 1. installs the carried wheels in .whl/ (if any) into /tmp/site, without their dependencies and
#    without touching the machine's torch: pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# 2. PYTHONPATH=/tmp/site:$PWD (this checkout's kaggle_utils, then the wheels)
# 3. prints nvidia-smi and the versions torch sees
# 4. runs: python3 benchmarks/gpu.py --device cuda --out "$OUT" --budget-s "$BUDGET_S"
#    (gpu_results.json rewritten after every measurement, table.md at the end, gpu_check.log: all output)
#
# Third-party packages benchmarks/gpu.py imports (through kaggle_utils): torch, numpy, PyYAML, tqdm,
# tifffile (uncompressed TIFFs only: imagecodecs is not needed), dynamic-network-architectures (nnU-Net
# presets), segmentation-models-pytorch-3d with timm-3d, pretrainedmodels, six, timm, torchvision and
# huggingface_hub (the smp preset kaggle-t4 only; without them that preset's rows are recorded as errors
# and the rest runs). scipy comes in with the synthetic data.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-check}"
BUDGET_S="${BUDGET_S:-420}"
mkdir -p "$OUT"
{
  if compgen -G ".whl/*.whl" > /dev/null; then
    mkdir -p /tmp/site
    python3 -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl \
      || echo "WARNING: installing the carried wheels failed (see above); continuing with what is installed"
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi || echo "nvidia-smi: not available"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpus', torch.cuda.device_count())"
  python3 benchmarks/gpu.py --device cuda --out "$OUT" --budget-s "$BUDGET_S"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
