#!/usr/bin/env bash
# Create .venv and install moetrain into it (CPU torch pinned: never pulls a CUDA build).
# Usage: bash scripts/setup.sh [extra]   e.g. `bash scripts/setup.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
spec="."
[ $# -ge 1 ] && spec=".[$1]"
# torch==2.13.0 first, in the same command: an unpinned resolver may otherwise pick a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" -e "$spec"
