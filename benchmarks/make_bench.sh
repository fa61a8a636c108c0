#!/usr/bin/env bash
# `make bench`: a short offline benchmark and a short serving sweep of the default model on this machine.
# Results (JSON, PNG) go to benchmarks/results/. Kept to a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
PORT=${BENCH_PORT:-8765}

$PY benchmarks/throughput.py --num-requests 16 --hf-batch-sizes 8 --single-decode-tokens 64 --out "$OUT"

$PY -m tokenmill.api.cli serve --host 127.0.0.1 --port "$PORT" --dtype float32 > "$OUT/bench-server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $server 2>/dev/null || { cat "$OUT/bench-server.log"; exit 1; }
  sleep 1
done
$PY benchmarks/serving.py --base-url "http://127.0.0.1:$PORT" --backend tokenmill --num-prompts 16 \
  --sweep 1,4,inf --out "$OUT" --metadata dtype=float32 device=cpu
echo "results in $OUT/:"
ls -1t "$OUT" | head -12
