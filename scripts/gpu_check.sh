#!/usr/bin/env bash
# One-GPU check of the CUDA path: prints one JSON line (see scripts/tools/gpu_check.py).
# Budget: under 8 minutes on one GPU (hard stop at 470 s). Without CUDA it prints
# {"cuda": false, ...} and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "${PYTHON:-python}" -m scripts.tools.gpu_check "$@"
