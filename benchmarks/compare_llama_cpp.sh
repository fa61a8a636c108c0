#!/usr/bin/env bash
# tokenmill vs llama.cpp's llama-server on the same GGUF, one server after the other in one sitting:
# the serving benchmark at 1, 8 and 32 requests in flight and at several Poisson request rates.
# Usage: benchmarks/compare_llama_cpp.sh [NUM_PROMPTS] [RATES] [NPS] [DTYPES]
#   NUM_PROMPTS per run (default 32); RATES a comma list of request rates (default 0.5,1,2);
#   NPS the llama-server parallel-slot settings to run, space-separated (default "8 32");
#   DTYPES tokenmill's dtypes to run, space-separated (default "float32 bfloat16"). llama-server
#   computes with the GGUF's own (Q4_1) weights; tokenmill dequantizes them to DTYPE.
#   SWEEPS (env): which sweeps to run, "concurrency rate" by default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${1:-32}
RATES=${2:-0.5,1,2}
NPS=${3:-8 32}
DTYPES=${4:-float32 bfloat16}
SWEEPS=${SWEEPS:-concurrency rate}
OUT=benchmarks/results
mkdir -p "$OUT"
LLAMA=$(PYTHON=$PY bash benchmarks/build_llama_server.sh | tail -n 1)
GGUF=$($PY -c "from engine.config import default_model_path; print(default_model_path())")

serve_and_bench() {  # NAME PORT DTYPE CMD...
  local name=$1 port=$2 dtype=$3; shift 3
  "$@" > "$OUT/$name-server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 180); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    kill -0 $pid 2>/dev/null || { cat "$OUT/$name-server.log"; return 1; }
    sleep 1
  done
  local bench=($PY benchmarks/serving.py --base-url "http://127.0.0.1:$port" --backend "$name"
               --num-prompts "$N" --out "$OUT" --no-progress --metadata "dtype=$dtype" device=cpu)
  # The two sweeps draw different prompts (seeds 0 and 1), so neither hits a prefix cache the other warmed.
  [[ " $SWEEPS " == *" concurrency "* ]] && { "${bench[@]}" --seed 0 --sweep-concurrency 1,8,32 || true; }
  [[ " $SWEEPS " == *" rate "* ]] && { "${bench[@]}" --seed 1 --sweep "$RATES" || true; }
  kill $pid; wait $pid 2>/dev/null || true
}

for DTYPE in $DTYPES; do
  serve_and_bench "tokenmill-$DTYPE" 8101 "$DTYPE" $PY -m api.cli serve --host 127.0.0.1 --port 8101 \
    --dtype "$DTYPE" --max-num-seqs 32
done
for NP in $NPS; do
  # Every slot gets a full 2,048-token context: room for the longest prompt plus its output.
  serve_and_bench "llama.cpp-np$NP" 8102 gguf-Q4_1 "$LLAMA" -m "$GGUF" -t 2 -np "$NP" -c $((NP * 2048)) \
    --host 127.0.0.1 --port 8102
done
