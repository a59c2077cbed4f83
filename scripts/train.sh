#!/usr/bin/env bash
# Install into .venv and train the embedded default (tiny MoE, bundled corpus, local Ray).
# Extra arguments go to `moetrain train`, e.g. `bash scripts/train.sh --set cluster.num_workers=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moetrain train "$@"
