#!/usr/bin/env bash
# The test suite: set-up (first run only), then pytest on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
# PASSIVE: OpenMP threads sleep instead of spinning, which avoids a 20x slowdown on a loaded 2-core machine.
OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m pytest -q "$@" tests
