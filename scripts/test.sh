#!/usr/bin/env bash
# The test suite: set-up (first run only), then pytest on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
# PASSIVE: OpenMP threads sleep instead of spinning, which avoids a 20x slowdown on a loaded 2-core machine.
# OPENBLAS_NUM_THREADS=1: numpy's eigendecompositions (FD-oracle) otherwise spin on a loaded machine (1.7 s → 0.03 s).
OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=1 .venv/bin/python -m pytest -q "$@" tests
