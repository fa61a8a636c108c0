# Sourced by the serving comparisons: start a server, wait for it, run benchmarks/serving.py against it, stop it.
# Needs PY (the Python to run) and OUT (the folder for logs and results).

start_server() {  # NAME PORT CMD... ; sets SERVER_PID once /health answers
  local name=$1 port=$2; shift 2
  "$@" > "$OUT/$name-server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
    kill -0 $SERVER_PID 2>/dev/null || { cat "$OUT/$name-server.log"; return 1; }
    sleep 1
  done
  return 1
}

stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; }

bench() {  # NAME PORT META NUM_PROMPTS ARGS...
  local name=$1 port=$2 meta=$3 n=$4; shift 4
  $PY benchmarks/serving.py --base-url "http://127.0.0.1:$port" --backend "$name" --num-prompts "$n" \
    --out "$OUT" --no-progress --metadata "$meta" device=cpu "$@" || true
}
