#!/usr/bin/env bash
# The demo: set up .venv, train Stage C, the text-conditional prior, on top of the shipped Stages A and B
# (weights/shapes/), then draw a grid for the demo prompts plus any prompts given as arguments.
# With --from-scratch it trains all three stages instead, in the same time budget (weaker: see README, Results).
# With --emoji it trains the emoji world's Stage C on the shipped emoji Stages A and B (weights/emoji/).
# Usage: bash scripts/demo.sh [--from-scratch | --emoji] ["a large red circle in the centre" ...]
#        (OUT=runs/other to change the folder; default runs/tiny, runs/scratch or runs/emoji)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
scratch=0 world=shapes
while [ $# -gt 0 ]; do
  case "$1" in
    --from-scratch) scratch=1; shift ;;
    --emoji) world=emoji; shift ;;
    *) break ;;
  esac
done
if [ $scratch = 1 ] && [ $world = emoji ]; then
  echo "error: --from-scratch with --emoji: expected one of them (the emoji world from scratch is" \
       "bash scripts/train_weights.sh emoji, about 70 minutes)" >&2; exit 2
fi
bash scripts/setup.sh requirements.txt
# OpenMP's default wait policy (threads spin between the many small ops of these tiny models) is about 2× faster
# than PASSIVE on an idle machine: Stage B at batch 32, 211 ms a step against 402 ms on 2 cores. On a machine busy
# with other work, spinning threads slow everything down; run with OMP_WAIT_POLICY=PASSIVE there.
out=${OUT:-runs/$([ $scratch = 1 ] && echo scratch || { [ $world = emoji ] && echo emoji || echo tiny; })}
case "$(cd "$(dirname "$out")" 2>/dev/null && pwd)/$(basename "$out")" in
  "$(pwd)/weights/shapes" | "$(pwd)/weights/emoji")
    echo "error: OUT=$out is a shipped weights' folder; expected a folder for this run, e.g. runs/tiny" >&2; exit 2 ;;
esac
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
  cp weights/$world/stage_a.safetensors weights/$world/stage_b.safetensors "$out"/
  grep -E '  stage_[ab]\.safetensors$' weights/$world/SHA256SUMS > "$out"/SHA256SUMS ||
    { echo "error: weights/$world/SHA256SUMS lacks the lines of stage_a and stage_b; git checkout -- weights" >&2; exit 1; }
fi
if [ $world = emoji ]; then
  # The emoji preset's Stage C runs 16,000 steps in the shipped recipe (40 minutes); 6,000 of them, with its
  # learning rate decaying over the last 3,000, fit 20 minutes (docs/emoji.md#the-demo).
  .venv/bin/python train.py --stage c --preset emoji --data emoji --out "$out" --steps 6000
elif [ $scratch = 0 ]; then
  # The tiny preset's Stage C for 8,000 of its 16,000 steps, to fit 20 minutes: on the same machine, the first half
  # of the shipped Stage C's run, bit for bit (scripts/train_weights.sh; the second half mostly improves two-object
  # prompts: README, Results).
  .venv/bin/python train.py --stage c --preset tiny --out "$out" --steps 8000
fi
.venv/bin/python sample.py --run "$out" --world "$world" --demo-prompts "$@"
echo "demo finished in $(( $(date +%s) - start )) s; training grids and checkpoints are in $out/"
