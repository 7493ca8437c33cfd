#!/usr/bin/env bash
# The GPU check of issue 14, in at most 8 minutes on one GPU (each stage under its own limit).
#
#   benchmarks/gpu_check.sh OUTDIR          (or: make gpu-check OUT=OUTDIR)
#   SMOKE=1 benchmarks/gpu_check.sh OUTDIR  (the CPU rehearsal at tiny sizes; the suite runs it)
#
# Uses the machine's own python3 (PYTHON=... to choose another) with the repository on
# PYTHONPATH and installs nothing: the packed CIFAR-10 subset (PACK, default data_subset/, made
# by python -m benchmarks.pack_cifar_subset) travels with the checkout, and any wheels in
# PACK/wheels/ (e.g. PyHessian) are put on PYTHONPATH as they are. Runs pytest -m cuda, then
# benchmarks/gpu_check.py's stages; writes OUTDIR/*.json, OUTDIR/gpu_check.json (the summary)
# and OUTDIR/gpu_check.log.
set -u -o pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACK=${PACK:-data_subset}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
WHEELS=""
for w in "$PACK"/wheels/*.whl; do [ -f "$w" ] && WHEELS="$WHEELS:$PWD/$w"; done
export PYTHONPATH="$PWD$WHEELS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
FLAGS=(--out "$OUT" --pack "$PACK")
[ "${SMOKE:-0}" = 1 ] && FLAGS+=(--smoke)
START=$(date +%s)

log() { echo "$*" | tee -a "$LOG"; }

stage() {   # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 rc
  shift 2
  log "=== $name (limit ${limit} s) at $(date -u +%H:%M:%S), $(( $(date +%s) - START )) s elapsed"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || log "=== $name ended with exit $rc$( [ "$rc" = 124 ] && echo ' (time limit)')"
  return 0
}

log "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), python $($PY -c 'import sys; print(sys.version.split()[0])')," \
    "torch $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")')"
stage "pytest -m cuda" 120 bash -c "$PY -m pytest -m cuda tests/cuda -ra -q -p no:cacheprovider > '$OUT/pytest_cuda.log' 2>&1; rc=\$?; tail -n 25 '$OUT/pytest_cuda.log'; exit \$rc"
stage throughput 110 "$PY" -m benchmarks.gpu_check throughput "${FLAGS[@]}"
stage hessian 80 "$PY" -m benchmarks.gpu_check hessian "${FLAGS[@]}"
stage run 110 "$PY" -m benchmarks.gpu_check run "${FLAGS[@]}"
# torch.compile (optional): whatever is left of 465 s, if at least 60 s
LEFT=$(( 465 - ($(date +%s) - START) ))
if [ "${SMOKE:-0}" != 1 ] && [ "$LEFT" -ge 60 ]; then
  stage compile "$LEFT" "$PY" -m benchmarks.gpu_check compile "${FLAGS[@]}"
else
  log "=== compile skipped (${LEFT} s left of the 8 minutes, or a smoke run)"
fi
stage collect 10 "$PY" -m benchmarks.gpu_check collect "${FLAGS[@]}"
log "gpu_check: done in $(( $(date +%s) - START )) s; summary in $OUT/gpu_check.json"
