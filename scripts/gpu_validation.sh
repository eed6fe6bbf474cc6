#!/usr/bin/env bash
# One device call's worth of GPU validation (see docs/gpu-validation.md). Run from the repo root on
# the lent GPU machine, whose torch/triton/transformers are preinstalled (nothing can be downloaded):
#   bash scripts/gpu_validation.sh            (writes into $OUT, or ./gpu-results without it)
# Steps are independent: one failing does not stop the others; the summary lists each exit code.
set -u
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=()

# The device tool returns at most 8 files: every step logs into run.log; JSONs and summary.txt beside it.
step() {  # step NAME COMMAND...: run, append to run.log, remember the exit code
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$out/run.log"
    "$@" >>"$out/run.log" 2>&1
    local rc=$?
    status+=("$name=$rc")
    echo "=== $name: exit $rc" | tee -a "$out/run.log"
}

step install python -m pip install --no-build-isolation --no-deps -e .
step info fastbert info
step tests python -m pytest tests -q -p no:cacheprovider
step bench_ops python -m pytest benchmarks/test_ops.py -q --benchmark-json="$out/bench-ops.json"
step bench_varlen fastbert bench --dtype bf16 --batch 32 --seq 512 --lengths uniform \
    --baselines hf-sdpa,hf-compile --json "$out/bench-varlen-b32x512.json"
step bench_full fastbert bench --dtype bf16 --batch 64 --seq 128 --lengths full \
    --baselines hf-sdpa,hf-compile --json "$out/bench-full-b64x128.json"
step bench_latency fastbert bench --dtype bf16 --batch 1 --seq 128 --lengths full --json "$out/bench-b1x128.json"
step bench_training fastbert bench --dtype bf16 --mode training --batch 32 --seq 128 --lengths uniform \
    --json "$out/bench-train-b32x128.json"
echo "summary: ${status[*]}" | tee "$out/summary.txt"
