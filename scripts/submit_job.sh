#!/usr/bin/env bash
# Submit `moetrain train` as a Ray job to a running cluster's job API; starts nothing itself.
#
#   bash scripts/submit_job.sh --config small --set cluster.num_workers=4
#   RAY_ADDRESS=http://head:8265 bash scripts/submit_job.sh --config my.yaml
#   NO_WAIT=1 bash scripts/submit_job.sh --config tiny      # print the submission id and return
#
# Arguments go to `moetrain train`. The address is $RAY_ADDRESS (the dashboard's HTTP address),
# default http://127.0.0.1:8265. The repository is uploaded as the job's working_dir.
# Equivalent raw command:
#   ray job submit --address "$RAY_ADDRESS" --working-dir . -- python -m cluster.cli train <args>
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
EXTRA=()
if [[ -n "${NO_WAIT:-}" ]]; then EXTRA+=(--no-wait); fi
exec "$PY" -m cluster.cli submit --address "$ADDRESS" "${EXTRA[@]}" -- "$@"
