#!/usr/bin/env bash
# Install into .venv with the test extra and run the whole test suite (real Ray, gloo, CBC/HiGHS,
# an S3-protocol server on 127.0.0.1). Extra arguments go to pytest. Without arguments (the whole
# suite: what CI runs) scripts/lint.sh runs first: ruff + mypy on placement/, moetrain/, cluster/
# (MOETRAIN_SKIP_LINT=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export MOETRAIN_CACHE_DIR="${MOETRAIN_CACHE_DIR:-$PWD/.cache/moetrain}"
export RAY_AUTH_MODE=disabled AWS_EC2_METADATA_DISABLED=true WANDB_MODE=offline
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
if [ $# -eq 0 ] && [ "${MOETRAIN_SKIP_LINT:-0}" != 1 ]; then
    bash scripts/lint.sh
fi
exec .venv/bin/python -m pytest "$@"
