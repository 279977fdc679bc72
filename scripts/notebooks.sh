#!/usr/bin/env bash
# Usage: bash scripts/notebooks.sh [--only 01 03] [--no-execute]
#   WUERSTCHEN_RUN=runs/tiny bash scripts/notebooks.sh     use the checkpoints of `bash scripts/demo.sh`
#   (unset: the shipped weights, weights/shapes/; WUERSTCHEN_RUN=train trains tiny models in runs/notebooks/)
# Re-runs the teaching notebooks and saves notebooks/*.ipynb with their outputs: notebooks/build.py reads each one's
# cells from its paired notebooks/NN_name.py, runs them with nbclient on .venv's Python and downsizes the pictures.
# Editing a notebook needs only `jupytext --sync`; this is for when code changed and the outputs must follow.
# See notebooks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
# PASSIVE: OpenMP threads sleep instead of spinning, which avoids a 20x slowdown on a loaded CPU.
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python notebooks/build.py "$@"
