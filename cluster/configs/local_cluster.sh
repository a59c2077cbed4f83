#!/usr/bin/env bash
# A multi-process Ray cluster on one machine: a head node plus extra worker "nodes" (each its own
# raylet), then moetrain jobs submitted to it through the Ray job API.
#
#   bash cluster/configs/local_cluster.sh start           # head: GCS, dashboard, job API, /metrics
#   bash cluster/configs/local_cluster.sh worker [CPUS]   # one more worker node (repeatable)
#   bash cluster/configs/local_cluster.sh multinode N [CPUS]  # head (HEAD_CPUS) + N worker nodes of CPUS
#   bash cluster/configs/local_cluster.sh status
#   bash cluster/configs/local_cluster.sh submit -- --config tiny --set cluster.num_workers=2
#   (multi-node: --set cluster.placement_strategy=SPREAD puts the ranks on different nodes)
#   bash cluster/configs/local_cluster.sh stop
#
# Run it from the repository root with the project's environment (.venv/bin is put on PATH: the
# job's entrypoint runs `python`, which must be the interpreter moetrain is installed in).
#
# Caveats
# - Token auth (Ray 2.60) is ON: the cluster and the clients this script starts run with
#   RAY_AUTH_MODE=token and the token in ~/.ray/auth_token (created by `start` if missing). Your own
#   `ray job ...` / `moetrain submit` need `export RAY_AUTH_MODE=token` on this machine (the token
#   file is read from there), or RAY_AUTH_TOKEN="$(ray get-auth-token)" elsewhere; the dashboard
#   asks for the token once in the browser. RAY_AUTH_MODE=disabled turns it off explicitly.
# - Everything Ray writes (sessions, logs, sockets) goes under $RAY_TMP (keep the path short: Ray's
#   socket paths have a length limit), not the shared default /tmp/ray.
# - `ray stop` stops EVERY Ray process of this user on the machine (it matches process names), not
#   only this cluster. On a shared machine stop by process id instead.
set -euo pipefail

cd "$(dirname "$0")/../.."
if [[ -x .venv/bin/ray ]]; then export PATH="$PWD/.venv/bin:$PATH"; fi

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
RAY_TMP="${RAY_TMP:-/tmp/moetrain-ray}"
HEAD_PORT="${HEAD_PORT:-6379}"            # GCS: workers and drivers join 127.0.0.1:$HEAD_PORT
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"  # dashboard + job API: http://127.0.0.1:$DASHBOARD_PORT
METRICS_PORT="${METRICS_PORT:-8080}"      # Prometheus text: http://127.0.0.1:$METRICS_PORT/metrics
HEAD_CPUS="${HEAD_CPUS:-2}"
# AGENT_PORT: the head's dashboard agent (runs the jobs); default 0 = a free port (Ray's fixed
# default, 52365, is often taken by another Ray on the same machine, and jobs then find no agent)

cmd="${1:-}"
shift || true
case "$cmd" in
  start)
    mkdir -p "$RAY_TMP"
    if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
      ray get-auth-token --generate >/dev/null   # ~/.ray/auth_token, if there is none yet
    fi
    # RAY_metrics_report_interval_ms: how often processes push custom metrics (default 10 s).
    RAY_metrics_report_interval_ms="${RAY_metrics_report_interval_ms:-2000}" \
    ray start --head --port="$HEAD_PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --metrics-export-port="$METRICS_PORT" --dashboard-agent-listen-port="${AGENT_PORT:-0}" \
      --num-cpus="$HEAD_CPUS" --temp-dir="$RAY_TMP" --disable-usage-stats
    echo "dashboard: http://127.0.0.1:$DASHBOARD_PORT   metrics: http://127.0.0.1:$METRICS_PORT/metrics"
    echo "RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT for jobs, RAY_ADDRESS=127.0.0.1:$HEAD_PORT for drivers"
    echo "token auth: RAY_AUTH_MODE=$RAY_AUTH_MODE (clients: export RAY_AUTH_MODE=$RAY_AUTH_MODE; token: ray get-auth-token)"
    ;;
  worker)
    # Another raylet joining the head: one more "node" on this machine, with its own CPUs and its
    # own temp dir under $RAY_TMP (w1, w2, ...), and Ray-chosen ports (none clash with the head's).
    i=1
    while [[ -e "$RAY_TMP/w$i" ]]; do i=$((i + 1)); done
    mkdir -p "$RAY_TMP/w$i"
    ray start --address="127.0.0.1:$HEAD_PORT" --num-cpus="${1:-2}" --temp-dir="$RAY_TMP/w$i" \
      --dashboard-agent-listen-port=0 --metrics-export-port=0 --disable-usage-stats
    ;;
  multinode)
    # A head plus N worker nodes: ranks land on the workers when HEAD_CPUS leaves no room for them.
    n="${1:?usage: $0 multinode N [CPUS]}"
    self="$PWD/cluster/configs/local_cluster.sh"
    bash "$self" start
    for _ in $(seq "$n"); do bash "$self" worker "${2:-2}"; done
    ;;
  status)
    ray status --address="127.0.0.1:$HEAD_PORT"
    ;;
  submit)
    # Same as: ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . \
    #            -- python -m cluster.cli train <args>
    exec python -m cluster.cli submit --address "http://127.0.0.1:$DASHBOARD_PORT" "$@"
    ;;
  stop)
    ray stop   # see the caveat above: all Ray processes of this user on the machine
    ;;
  *)
    echo "usage: $0 start | worker [CPUS] | multinode N [CPUS] | status | submit -- <train args> | stop" >&2
    exit 2
    ;;
esac
