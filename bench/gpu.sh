#!/usr/bin/env bash
# The prepared GPU session (one call of a lent GPU machine; see docs/performance.md): stacked training's
# CUDA checks (tests/test_stack.py: fp32 equal to one model per run, bf16 close), the grid section in
# bf16 (cls and tokens grids, 4,500-post cache, stacked vs one model per run) and the extraction section
# with base-size encoders. Everything goes under $OUT (default bench/gpu); each part has its own time limit
# so one that runs long cannot take the others' results with it. Needs only what is installed: run from
# a checkout with `bash bench/gpu.sh` (python3 with torch, transformers, h5py, scikit-learn, typer, tqdm).
set -u
OUT=${OUT:-bench/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MMCACHE_PROGRESS_INTERVAL=30
{
  nvidia-smi -L 2>&1
  $PY -c "import torch, mmcache; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), mmcache.__file__)"
  timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_stack.py 2>&1 | tail -20
} > "$OUT/checks.txt" 2>&1
timeout "${GRID_TIMEOUT:-330}" $PY cli.py bench --only grid --device "$DEVICE" --grid-samples "${GRID_SAMPLES:-4500}" \
  --grid-tokens-large --out-dir "$OUT/grid" --work-dir "${WORK:-/tmp/mmbench}" > "$OUT/grid.log" 2>&1
echo "grid exit $?" >> "$OUT/checks.txt"
timeout "${EXTRACT_TIMEOUT:-120}" $PY cli.py bench --only extraction --preset "${PRESET:-base}" --device "$DEVICE" \
  --precision "${PRECISION:-bf16}" --samples "${SAMPLES:-256}" --batch-sizes 32,128 --no-memory \
  --out-dir "$OUT/extract" --work-dir "${WORK:-/tmp/mmbench}" > "$OUT/extract.log" 2>&1
echo "extract exit $?" >> "$OUT/checks.txt"
tail -c 3000 "$OUT/grid.log" "$OUT/extract.log"
cat "$OUT/checks.txt"
