#!/usr/bin/env bash
# The demo: set up .venv, train Stage C, the text-conditional prior, on top of the shipped Stages A and B
# (weights/shapes/), then draw a grid for the demo prompts plus any prompts given as arguments.
# With --from-scratch it trains all three stages instead, in the same time budget (weaker: see README, Results).
# Usage: bash scripts/demo.sh [--from-scratch] ["a large red circle in the centre" ...]
#        (OUT=runs/other to change the folder; default runs/tiny, or runs/scratch with --from-scratch)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scratch=0
if [ "${1:-}" = "--from-scratch" ]; then scratch=1; shift; fi
bash scripts/setup.sh requirements.txt
# OpenMP's default wait policy (threads spin between the many small ops of these tiny models) is about 2× faster
# than PASSIVE on an idle machine: Stage B at batch 32, 211 ms a step against 402 ms on 2 cores. On a machine busy
# with other work, spinning threads slow everything down; run with OMP_WAIT_POLICY=PASSIVE there.
out=${OUT:-runs/$([ $scratch = 1 ] && echo scratch || echo tiny)}
if [ "$(cd "$(dirname "$out")" 2>/dev/null && pwd)/$(basename "$out")" = "$(pwd)/weights/shapes" ]; then
  echo "error: OUT=$out is the shipped weights' folder; expected a folder for this run, e.g. runs/tiny" >&2; exit 2
fi
mkdir -p "$out"
rm -f "$out"/stage_[abc].pt "$out"/stage_[abc].safetensors "$out"/SHA256SUMS   # a fresh run: nothing earlier reused
if [ $scratch = 1 ]; then
  # The tiny preset's full recipe (scripts/train_weights.sh) takes far longer; these step counts fit 20 minutes in
  # all. --lr-decay 0: Stage B at a constant rate; the preset's decay over its last 2,000 steps would be nearly all
  # of these, and decaying over the second half did worse (docs/shipped.md#for-comparison-all-three-stages-from-scratch).
  .venv/bin/python train.py --stage a --preset tiny --out "$out" --steps 600
  .venv/bin/python train.py --stage b --preset tiny --out "$out" --steps 2200 --lr-decay 0
  .venv/bin/python train.py --stage c --preset tiny --out "$out" --steps 2500 --dataset-size 4096
else
  # Stages A and B are the shipped ones, with their lines of the manifest: each is checked when it loads.
  cp weights/shapes/stage_a.safetensors weights/shapes/stage_b.safetensors "$out"/
  grep -E '  stage_[ab]\.safetensors$' weights/shapes/SHA256SUMS > "$out"/SHA256SUMS ||
    { echo "error: weights/shapes/SHA256SUMS lacks the lines of stage_a and stage_b; git checkout -- weights" >&2; exit 1; }
  # The tiny preset's Stage C for 8,000 of its 16,000 steps, to fit 20 minutes: on the same machine, the first half
  # of the shipped Stage C's run, bit for bit (scripts/train_weights.sh; the second half mostly improves two-object
  # prompts: README, Results).
  .venv/bin/python train.py --stage c --preset tiny --out "$out" --steps 8000
fi
.venv/bin/python sample.py --run "$out" --demo-prompts "$@"
echo "demo finished in $(( $(date +%s) - start )) s; training grids and checkpoints are in $out/"
