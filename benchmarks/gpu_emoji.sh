#!/usr/bin/env bash
# The one-GPU recipe on real images (issue 22): the `small` preset trained from scratch on the emoji world at
# 128², all three stages, within 8 minutes of device time; then experiments/evaluate_emoji.py on the run, and its
# tables and image grid copied to docs/gpu_emoji/.
#
#   bash benchmarks/gpu_emoji.sh                    # on the lent GPU (bf16 autocast)
#   DRY_RUN=1 bash benchmarks/gpu_emoji.sh          # a CPU dry run of the same steps at the tiny preset, seconds
#   LIMITS="90 180 150 60" bash benchmarks/gpu_emoji.sh   # other per-step limits, in seconds
#
# The evaluation's CNN oracle is trained once on the CPU (about 25 minutes on 2 cores) and cached in
# runs/oracle_cache/; train it before the device run (`experiments/evaluate_emoji.py --no-generation`) and carry
# that folder to the device machine, or the evaluation step spends its limit training it.
#
# Each stage runs under its own time limit. train.py writes a checkpoint every SAVE steps (atomically), so a stage
# stopped by its limit still leaves its last checkpoint, and the next stage trains on that. The step counts are
# guesses from docs/speed.md (small preset at 256²: A 105 ms, B 180 ms, C 51 ms a step at batch 32, bf16), at a
# quarter of the pixels; the limits, not the counts, keep it inside 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/gpu_emoji}
DOCS=${DOCS:-docs/gpu_emoji}
mkdir -p "$RUN" "$DOCS"
export OMP_WAIT_POLICY=PASSIVE

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    common=(--preset tiny --data emoji --device cpu --image-size 64 --save-every 2 --sample-every 100
            --dataset-size 64)
    steps=(2 2 2)
    eval_flags=(--n 8 --k 1 --n-held-out 4 --prior-steps 2 --decoder-steps 2 --bootstrap 50 --oracle-views 1
                --oracle-epochs 1 --cache-dir "$RUN/oracle_cache")
    limits=(120 120 120 300)
else
    common=(--preset small --data emoji --device cuda --precision bf16 --image-size 128 --save-every 250
            --sample-every 1000 --dataset-size 16384 --cache-frozen true)
    steps=(2000 3000 4000); eval_flags=(--n 200 --k 2 --n-held-out 100)
    ls runs/oracle_cache/emoji_oracle_*.pt > /dev/null 2>&1 ||
        echo "warning: no cached CNN oracle in runs/oracle_cache/; the evaluation will train one first" >&2
    limits=(90 170 150 70)              # seconds: 480 in all
fi
[[ -n "${LIMITS:-}" ]] && read -r -a limits <<< "$LIMITS"

step() {   # step NAME LIMIT COMMAND...: run with a time limit, log to $RUN/NAME.log, never stop the script
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s): $*" >&2
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$RUN/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s" >&2
    tail -n 3 "$RUN/$name.log" >&2
}

step stage_a "${limits[0]}" "$PY" train.py --stage a "${common[@]}" --out "$RUN" --steps "${steps[0]}" \
    --no-adversarial --no-progress
step stage_b "${limits[1]}" "$PY" train.py --stage b "${common[@]}" --out "$RUN" --steps "${steps[1]}" --no-progress
step stage_c "${limits[2]}" "$PY" train.py --stage c "${common[@]}" --out "$RUN" --steps "${steps[2]}" --no-progress
step evaluate "${limits[3]}" "$PY" experiments/evaluate_emoji.py --run "$RUN" "${eval_flags[@]}" \
    --json "$DOCS/eval.json"
cp "$RUN"/stage_[abc].log.jsonl "$DOCS"/ 2>/dev/null
cp "$RUN/evaluate.log" "$DOCS/evaluate.md" 2>/dev/null
echo "figures and grid: $DOCS/ (eval.json, eval.png, evaluate.md, stage_x.log.jsonl)"
