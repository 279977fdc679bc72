#!/usr/bin/env bash
# Issue 6's GPU benchmark in one go, within 10 minutes: sampling at the paper preset (1024², bf16 autocast, random
# weights) against diffusers at batch 1 and 4, the same at batch 1 with a compiled copy of ours, then training
# throughput and MFU at the small and paper presets. Each step has its own time limit and writes its numbers as
# it goes, so a step that runs out of time still leaves the others' tables. The tables are printed last; every
# number is in $OUT/*.json.
#
#   bash benchmarks/gpu_bench.sh                 # on the lent GPU
#   DRY_RUN=1 bash benchmarks/gpu_bench.sh       # CPU dry run of the same steps at the tiny preset (a few minutes)
#   LIMITS="170 110 50 70" bash benchmarks/gpu_bench.sh   # other per-step limits, in seconds
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/bench/gpu}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    sample=(--preset tiny --device cpu --precision fp32 --threads 2 --runs 2 --warmup 1 --prior-steps 3
            --decoder-steps 2 --no-memory)
    train_small=(--preset tiny --device cpu --threads 2 --steps 2 --warmup 1)
    train_paper=(--preset tiny --device cpu --threads 2 --steps 2 --warmup 1 --batch-a 2 --batch-b 2 --batch-c 2)
    limits=(300 300 60 60)
else
    sample=(--preset paper --device cuda --precision bf16 --runs 5 --warmup 1)
    train_small=(--preset small --device cuda --precision bf16 --steps 5 --warmup 2)
    # Batch 4 for A and B at 1024² (train.py's 8 may not fit one card next to AdamW's states); C keeps 8.
    train_paper=(--preset paper --device cuda --precision bf16 --steps 5 --warmup 2 --batch-a 4 --batch-b 4)
    limits=(240 180 60 80)               # seconds: 560 in all, under the 10-minute limit
fi
# LIMITS="170 110 50 70" overrides the four steps' limits, e.g. to leave room for gpu_smoke.py in the same lease.
[[ -n "${LIMITS:-}" ]] && read -r -a limits <<< "$LIMITS"

step() {   # step NAME LIMIT COMMAND...: run with a time limit, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s): $*" >&2
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s" >&2
    [[ $rc == 0 ]] || tail -5 "$OUT/$name.log" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>/dev/null || \
    echo "no nvidia-smi (CPU dry run)" > "$OUT/device.txt"
step sample_eager "${limits[0]}" "$PY" benchmarks/bench_sample.py "${sample[@]}" --batch 1 4 \
    --keep "$OUT/weights" --json "$OUT/sample_eager.json"
step sample_compiled "${limits[1]}" "$PY" benchmarks/bench_sample.py "${sample[@]}" --batch 1 --compile \
    --no-flops --keep "$OUT/weights" --json "$OUT/sample_compiled.json"
rm -rf "$OUT/weights"                                      # 8 GB of random weights at the paper preset
step train_small "${limits[2]}" "$PY" benchmarks/bench_train.py "${train_small[@]}" --json "$OUT/train_small.json"
step train_paper "${limits[3]}" "$PY" benchmarks/bench_train.py "${train_paper[@]}" --json "$OUT/train_paper.json"

echo
echo "# GPU benchmark, $(date -u +%Y-%m-%d), $(cat "$OUT/device.txt")"
for name in sample_eager sample_compiled train_small train_paper; do
    echo
    echo "## $name"
    cat "$OUT/$name.md" 2>/dev/null || echo "(no numbers: see $OUT/$name.log)"
done
