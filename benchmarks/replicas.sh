#!/usr/bin/env bash
# Served throughput of one `tokenmill serve` process against engine replicas on Ray Serve (`--ray`), on this
# machine, one server after the other in one sitting: the same cores as one engine with all the threads, one
# replica with them all, and N replicas with a share each.
# Usage: benchmarks/replicas.sh [REPLICAS] [CONCURRENCY]
#   REPLICAS the replica count to compare (default 2); CONCURRENCY the in-flight points, a comma list
#   (default 8,32), each sending 2C requests of the seeded mixed workload to a fresh server.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPLICAS=${1:-2}
CONCURRENCY=${2:-8,32}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/servers.sh
CPUS=$(nproc)
PORT=8103

run() {  # NAME META CMD...
  local name=$1 meta=$2; shift 2
  for c in ${CONCURRENCY//,/ }; do
    start_server "$name" $PORT "$@"
    bench "$name" $PORT "$meta" $((2 * c)) --seed 0 --max-concurrency "$c"
    stop_server
  done
}

SERVE=($PY -m tokenmill.api.cli serve --host 127.0.0.1 --port $PORT --max-num-seqs 64)
run tokenmill-1process "replicas=0 threads=$CPUS" "${SERVE[@]}"
run tokenmill-ray-1replica "replicas=1 threads=$CPUS" "${SERVE[@]}" --ray --num-replicas 1 --cpus-per-replica "$CPUS"
run "tokenmill-ray-${REPLICAS}replicas" "replicas=$REPLICAS threads=$((CPUS / REPLICAS))" "${SERVE[@]}" --ray \
  --num-replicas "$REPLICAS" --cpus-per-replica $((CPUS / REPLICAS))
