#!/usr/bin/env bash
# The GPU checks in one device call, in order of importance, each under its own time limit so a
# slow one cannot starve the rest. Results land in $OUT (at most 8 files come back):
#   native_overhead.json / .log   issue 3: native backend on a ~1B Llama bf16 step (<= 1 %), no sync
#   cudagraph.json / .log         CUDA graphs, torch.compile and Triton counted (closed forms)
#   energy_check.json / .log      NVML energy per step against an independent power trace
# Usage on the machine, from the repository root:  bash benchmarks/gpu/device_run.sh [--quick]
set -u
OUT=${OUT:-/tmp/flopcount-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
export FLOPCOUNT_NATIVE_CACHE=/tmp/flopcount-native MPLBACKEND=Agg
QUICK=${1:-}
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
$PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"

start=$SECONDS
timeout 330 $PY benchmarks/gpu/native_overhead.py --out "$OUT" $QUICK 2>&1 | tee "$OUT/native_overhead.log"
echo "== native_overhead: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"

start=$SECONDS
timeout 150 $PY benchmarks/gpu/cudagraph_check.py --out "$OUT/cudagraph.json" 2>&1 | tee "$OUT/cudagraph.log"
echo "== cudagraph_check: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"

start=$SECONDS
[ -n "${SKIP_ENERGY:-}" ] || timeout 100 $PY benchmarks/gpu/energy_check.py --out /tmp/energy --steps 8 2>&1 | tee "$OUT/energy_check.log"
echo "== energy_check: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
cp /tmp/energy/energy_check.json "$OUT/" 2>/dev/null
true
