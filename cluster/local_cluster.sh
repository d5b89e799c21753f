#!/usr/bin/env bash
# A local multi-node Ray cluster for development: one head plus N worker-node processes, all on
# 127.0.0.1 with explicit free ports (6379 is often a Redis), in its own temp dir.
#   cluster/local_cluster.sh start [N_WORKER_NODES=1] [CPUS_PER_NODE=2]   # prints the exports to use
#   cluster/local_cluster.sh stop
# `stop` ends only this cluster's processes (never `ray stop`, which is machine-wide).
set -euo pipefail
cd "$(dirname "$0")/.."
TEMP_DIR="${DSL_RAY_TEMP_DIR:-/tmp/ray-dsl-dev}"
case "${1:-}" in
  start)
    python -m dsl.service.local_cluster start --temp-dir "$TEMP_DIR" --workers "${2:-1}" \
      --head-cpus "${3:-2}" --cpus "${3:-2}"
    ;;
  stop)
    python -m dsl.service.local_cluster stop --temp-dir "$TEMP_DIR"
    ;;
  *)
    echo "usage: $0 start [worker_nodes] [cpus_per_node] | stop" >&2
    exit 2
    ;;
esac
