#!/usr/bin/env bash
# Install into .venv and train the embedded default: the tiny MoE on the bundled corpus, expert-
# parallel on 2 Ray actors of an embedded local Ray (fits a 2-core machine), with the Ray dashboard
# on 127.0.0.1: the driver prints its URL, how to sign in (`ray get-auth-token`) and what to watch.
# Extra arguments go to `moetrain train`, e.g. `bash scripts/train.sh --set train.steps=50`,
# `--set cluster.num_workers=4` or `--set cluster.dashboard=false`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moetrain train "$@"
