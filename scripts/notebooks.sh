#!/usr/bin/env bash
# Regenerates the teaching notebooks (notebooks/*.ipynb) with their outputs: notebooks/build.py writes them from its
# cells, runs them with nbclient on .venv's Python and saves them with downsized pictures. See notebooks/README.md.
# Usage: bash scripts/notebooks.sh [--only 01 03] [--no-execute]
#   WUERSTCHEN_RUN=runs/tiny bash scripts/notebooks.sh     use the checkpoints of `bash scripts/demo.sh`
#   (without WUERSTCHEN_RUN, tiny models are trained in runs/notebooks/, a few minutes per stage, and reused)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
# PASSIVE: OpenMP threads sleep instead of spinning, which avoids a 20x slowdown on a loaded CPU.
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python notebooks/build.py "$@"
