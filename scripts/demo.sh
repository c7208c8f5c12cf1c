#!/usr/bin/env bash
# The main job on the embedded synthetic dataset (called by `make demo`):
# generate -> check -> train briefly on CPU -> predict -> submission.zip -> validate -> score, beside trivial baselines.
# Usage: bash scripts/demo.sh PYTHON OUT_DIR
set -euo pipefail
PY=${1:-python3}
OUT=${2:-demo}
KU="$PY -m kaggle_utils"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

echo "== 1/6 synthetic competition data"
$KU synth --out "$OUT/data" --n-train 10 --n-test 3 --size 96 --n-scrolls 4 --seed 0 --preview "$OUT/preview.png"
echo "== 2/6 check-data"
$KU check-data "$OUT/data" | tail -5
echo "== 3/6 train (shipped config demo-cpu, fold 0)"
$KU train --config demo-cpu --fold 0 --data-dir "$OUT/data" --out "$OUT/run"
echo "== 4/6 predict -> $OUT/submission.zip"
$KU predict --checkpoint "$OUT/run/best.pt" --data-dir "$OUT/data" --out "$OUT/submission.zip" --device cpu
$KU validate-submission "$OUT/submission.zip" --data-dir "$OUT/data"
echo "== 5/6 baselines"
$KU baseline --kind zeros --data-dir "$OUT/data" --out "$OUT/baseline_zeros.zip"
$KU baseline --kind otsu --data-dir "$OUT/data" --out "$OUT/baseline_otsu.zip"
echo "== 6/6 local competition score on the synthetic test set (hidden labels in $OUT/data/test_labels)"
for name in submission baseline_zeros baseline_otsu; do
  $KU score "$OUT/$name.zip" "$OUT/data/test_labels" --json > "$OUT/score_$name.json"
done
$PY - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
print(f"{'prediction':<22} {'score':>7} {'topo':>7} {'SD':>7} {'VOI':>7}")
for name in ("submission", "baseline_zeros", "baseline_otsu"):
    res = json.load(open(f"{out}/score_{name}.json"))
    vols = res["volumes"].values()
    mean = lambda k: sum(v[k] for v in vols) / len(vols)
    print(f"{name:<22} {res['mean']:7.4f} {mean('topo_score'):7.4f} {mean('surface_dice'):7.4f} {mean('voi_score'):7.4f}")
PYEOF
$KU diagnose "$OUT/submission.zip" --data-dir "$OUT/data" --out "$OUT/diagnose.png" | tail -1
