#!/usr/bin/env bash
# The GPU path in one command, on a machine with a CUDA GPU, from a plain checkout (no `make install`,
# no server packages, no model files: every model is random):
#   kernels-tests  tests/kernels/test_triton_*.py compiled on the GPU (TRITON_INTERPRET unset)
#   exactness      greedy tokens of a random Llama checkpoint, tokenmill vs transformers, float32 and bf16
#   kernels        benchmarks/triton_kernels.py: the Triton kernels against torch's SDPA and references
#   throughput     benchmarks/throughput.py, dummy weights, nano-vllm's workload (256 requests of random
#                  ids, input and output lengths 100..1024) on Qwen3-0.6B and Llama-3-8B
# then benchmarks/gpu_report.py writes OUT/summary.md and OUT/summary.json.
#
#   bash benchmarks/gpu.sh [--quick] [--out DIR] [--only PART[,PART]] [--dry-run]
#   PY=/path/to/python bash benchmarks/gpu.sh ...      (default: python on PATH, else python3)
#
# --dry-run checks the arguments, writes the checkpoint it would use and prints every command without
# running it; it needs no GPU. A failed part does not stop the others; the exit status says if any failed.
set -uo pipefail

PARTS="kernels-tests exactness kernels throughput"
THROUGHPUT_MODELS="qwen3-0.6b llama-3-8b"

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
}

die() {
    echo "gpu.sh: $*" >&2
    echo "usage: bash benchmarks/gpu.sh [--quick] [--out DIR] [--only PART[,PART]] [--dry-run]" >&2
    exit 2
}

QUICK=0
DRY_RUN=0
OUT=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --out) [ $# -ge 2 ] && [ -n "$2" ] && [[ $2 != -* ]] || die "--out needs a directory"; OUT=$2; shift ;;
        --out=*) OUT=${1#--out=}; [ -n "$OUT" ] || die "--out needs a directory" ;;
        --only) [ $# -ge 2 ] && [ -n "$2" ] && [[ $2 != -* ]] || die "--only needs a part: ${PARTS// /, }"; ONLY=$2; shift ;;
        --only=*) ONLY=${1#--only=}; [ -n "$ONLY" ] || die "--only needs a part: ${PARTS// /, }" ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done
for part in ${ONLY//,/ }; do
    [[ " $PARTS " == *" $part "* ]] || die "unknown part '$part' for --only; the parts are ${PARTS// /, }"
done
SELECTED=${ONLY:+${ONLY//,/ }}
SELECTED=${SELECTED:-$PARTS}

cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-$(command -v python || command -v python3)}
[ -n "$PY" ] && command -v "$PY" >/dev/null \
    || die "python not found (PY=${PY:-unset}); put python on PATH or set PY=/path/to/python"
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p -- "$OUT" || die "cannot create --out $OUT"
for m in $THROUGHPUT_MODELS; do
    [ -f "benchmarks/configs/$m.json" ] || die "benchmarks/configs/$m.json is missing"
done
# The kernels must compile for the GPU: an inherited TRITON_INTERPRET=1 would run them interpreted.
unset TRITON_INTERPRET
if [ "$DRY_RUN" = 0 ]; then
    "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
        || die "no CUDA GPU visible to $PY (torch.cuda.is_available() is False); --dry-run needs none"
fi

FAILED=""
# Print a part's command; run it unless --dry-run. A failure is noted and the next part runs.
step() {
    local part=$1
    shift
    printf '+'; printf ' %q' "$@"; printf '\n'
    [ "$DRY_RUN" = 1 ] && return 0
    "$@" || FAILED="$FAILED $part"
}
selected() { [[ " $SELECTED " == *" $1 "* ]]; }
QUICK_FLAG=()
[ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)

if selected kernels-tests; then
    step kernels-tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton_*.py \
        --junitxml="$OUT/kernel-tests.xml"
fi
if selected exactness; then
    # Written in a dry run too: it is the checkpoint the run would compare on, and checks transformers.
    printf '+ %q benchmarks/random_checkpoint.py %q\n' "$PY" "$OUT/checkpoint"
    if "$PY" benchmarks/random_checkpoint.py "$OUT/checkpoint" >/dev/null; then
        step exactness "$PY" benchmarks/exactness.py --model "$OUT/checkpoint" --device cuda \
            --out "$OUT/exactness.json" "${QUICK_FLAG[@]}"
    else
        FAILED="$FAILED exactness"
    fi
fi
if selected kernels; then
    step kernels "$PY" benchmarks/triton_kernels.py --out "$OUT/kernels.json" "${QUICK_FLAG[@]}"
fi
if selected throughput; then
    requests=256
    [ "$QUICK" = 1 ] && requests=64
    for m in $THROUGHPUT_MODELS; do
        # nano-vllm's bench.py: all requests admitted at once, 16k tokens a step, bf16.
        step "throughput-$m" "$PY" benchmarks/throughput.py --model "benchmarks/configs/$m.json" \
            --load-format dummy --dtype bfloat16 --device cuda --random-ids 100,1024 \
            --num-requests "$requests" --max-num-seqs 256 --max-num-batched-tokens 16384 \
            --hf-batch-sizes "" --out "$OUT"
    done
fi
step report "$PY" benchmarks/gpu_report.py "$OUT"

if [ -n "$FAILED" ]; then
    echo "gpu.sh: failed:$FAILED (records in $OUT)" >&2
    exit 1
fi
if [ "$DRY_RUN" = 1 ]; then
    echo "gpu.sh: dry run done, nothing else ran; records would go to $OUT"
else
    echo "gpu.sh: done; records and summary.md in $OUT"
fi
