#!/usr/bin/env bash
# The main job: set up .venv, train Stages A, B and C at the tiny preset on the built-in captioned shapes, then
# draw a grid for the demo prompts plus any prompts given as arguments.
# Usage: bash scripts/demo.sh ["a large red circle in the centre" ...]     (OUT=runs/other to change the folder)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh requirements.txt
# PASSIVE: OpenMP threads sleep instead of spinning, which avoids a 20x slowdown on a loaded CPU.
export OMP_WAIT_POLICY=PASSIVE
out=${OUT:-runs/tiny}
for stage in a b c; do
  .venv/bin/python train.py --stage "$stage" --preset tiny --out "$out"
done
.venv/bin/python sample.py --run "$out" --demo-prompts "$@"
echo "demo finished in $(( $(date +%s) - start )) s; training grids and checkpoints are in $out/"
