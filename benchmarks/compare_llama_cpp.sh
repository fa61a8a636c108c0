#!/usr/bin/env bash
# tokenmill vs llama.cpp's llama-server on the same GGUF, one server after the other in one sitting.
# The concurrency sweep starts a fresh server for each point (1, 8, 32, 64 requests in flight by default),
# so no point inherits a warm prefix cache or a queue from the one before; the request-rate sweep runs
# its rates on one server.
# Usage: benchmarks/compare_llama_cpp.sh [NUM_PROMPTS] [RATES] [NPS] [MODES]
#   NUM_PROMPTS per run (default 32; a concurrency point C sends at least 2C); RATES a comma list of request rates (default 0.5,1,2);
#   NPS the llama-server parallel-slot settings, space-separated (default "8 32"; "" for none);
#   MODES tokenmill's settings, space-separated (default "float32 bfloat16"): float32 and bfloat16 are
#   dtypes (weights dequantized); int8, int4 and gguf are --quantization modes (bf16 activations).
#   llama-server always computes with the GGUF's own (Q4_1) weights.
#   CONCURRENCY (env): the in-flight points, default 1,8,32,64. SWEEPS (env): "concurrency rate" by default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${1:-32}
RATES=${2:-0.5,1,2}
NPS=${3-8 32}  # an empty NPS runs no llama-server
MODES=${4:-float32 bfloat16}
CONCURRENCY=${CONCURRENCY:-1,8,32,64}
SWEEPS=${SWEEPS:-concurrency rate}
OUT=benchmarks/results
mkdir -p "$OUT"
source benchmarks/servers.sh
LLAMA=$(PYTHON=$PY bash benchmarks/build_llama_server.sh | tail -n 1)
GGUF=$($PY -c "from tokenmill.engine.config import default_model_path; print(default_model_path())")

serve_and_bench() {  # NAME PORT META CMD...
  local name=$1 port=$2 meta=$3; shift 3
  if [[ " $SWEEPS " == *" concurrency "* ]]; then
    for c in ${CONCURRENCY//,/ }; do
      start_server "$name" "$port" "$@"
      # At least two requests per slot, so that C requests are really in flight for most of the run.
      bench "$name" "$port" "$meta" $((2 * c > N ? 2 * c : N)) --seed 0 --max-concurrency "$c"
      stop_server
    done
  fi
  if [[ " $SWEEPS " == *" rate "* ]]; then
    # Seed 1: other prompts than the concurrency sweep's.
    start_server "$name" "$port" "$@"
    bench "$name" "$port" "$meta" "$N" --seed 1 --sweep "$RATES"
    stop_server
  fi
}

for MODE in $MODES; do
  case $MODE in
    float32|bfloat16) flags=(--dtype "$MODE") ;;
    *) flags=(--quantization "$MODE") ;;
  esac
  serve_and_bench "tokenmill-$MODE" 8101 "mode=$MODE" $PY -m tokenmill.api.cli serve --host 127.0.0.1 --port 8101 \
    --max-num-seqs 64 "${flags[@]}"
done
for NP in $NPS; do
  # Every slot gets a full 2,048-token context: room for the longest prompt plus its output.
  serve_and_bench "llama.cpp-np$NP" 8102 mode=gguf-Q4_1 "$LLAMA" -m "$GGUF" -t 2 -np "$NP" -c $((NP * 2048)) \
    --host 127.0.0.1 --port 8102
done
