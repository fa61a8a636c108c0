#!/usr/bin/env bash
# Build llama.cpp's `llama-server` as a peer to benchmark tokenmill against.
#
# The sources come from the PyPI sdist of llama-cpp-python, which vendors llama.cpp
# under vendor/llama.cpp: PyPI is reachable where GitHub may not be, and the sdist
# pins a consistent llama.cpp revision. Everything lives in a cache folder outside
# the repository. Idempotent: a second run only prints the binary's path.
#
# Usage: benchmarks/build_llama_server.sh [CACHE_DIR]
#   CACHE_DIR defaults to $TOKENMILL_LLAMA_CACHE or ~/.cache/tokenmill/llama.cpp
#   PYTHON (env) picks the interpreter that downloads the sdist (default python3).
#   LLAMA_CPP_PYTHON_VERSION (env) pins the sdist version (default: latest).
#   LLAMA_CMAKE_ARGS (env) adds cmake arguments (e.g. "-DGGML_CUDA=ON").
# The last line of stdout is the absolute path of llama-server; llama-perplexity lies beside it.
set -euo pipefail

CACHE="${1:-${TOKENMILL_LLAMA_CACHE:-$HOME/.cache/tokenmill/llama.cpp}}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
BIN="$CACHE/build/bin/llama-server"

# Static, no libcurl (no model downloads needed; the server is given a local GGUF).
CMAKE_ARGS=(-DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
if [[ "$(uname -m)" == x86_64 ]]; then
    # Without AMX: the native build picks up AMX on CPUs that advertise it, and
    # llama.cpp's AMX matmul segfaults while loading the model on such a VM (seen
    # with llama-cpp-python 0.3.36's llama.cpp, SmolLM2 Q4_1). Explicit -mno-amx-*
    # wins over -march=native whatever the order.
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX")
fi
# shellcheck disable=SC2206 # word splitting of the user's extra arguments is intended
CMAKE_ARGS+=(${LLAMA_CMAKE_ARGS:-})

# Rebuild only when the binary is missing or was built with other arguments.
STAMP="$CACHE/build/tokenmill-cmake-args"
if [[ -x "$BIN" && -x "${BIN%/*}/llama-perplexity" && -f "$STAMP" && "$(cat "$STAMP")" == "${CMAKE_ARGS[*]}" ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE/sdist"
if ! compgen -G "$CACHE/sdist/llama_cpp_python-*.tar.gz" >/dev/null; then
    echo "downloading the llama-cpp-python sdist into $CACHE/sdist" >&2
    # Straight from the index: `pip download --no-binary` would build scikit-build-core and cmake from
    # source just to read the package's metadata.
    "$PYTHON" - "$CACHE/sdist" "${LLAMA_CPP_PYTHON_VERSION:-}" <<'PY' >&2
import hashlib, re, sys, urllib.request
folder, version = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
links = re.findall(r'href="([^"]*/llama_cpp_python-([0-9.]+)\.tar\.gz)#sha256=([0-9a-f]+)"', page)
if version:
    links = [link for link in links if link[1] == version]
url, version, digest = max(links, key=lambda link: tuple(map(int, link[1].split("."))))
data = urllib.request.urlopen(url).read()
assert hashlib.sha256(data).hexdigest() == digest, "sdist checksum mismatch"
open(f"{folder}/llama_cpp_python-{version}.tar.gz", "wb").write(data)
PY
fi
SDIST="$(ls -1 "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)"

# Unpack into a fresh folder each time the source is missing, so a half-extracted
# tree from an interrupted run is never built.
SRC="$CACHE/src"
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
fi

cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" "${CMAKE_ARGS[@]}" >&2
# llama-perplexity too: the quality report measures llama.cpp's perplexity on the same text.
cmake --build "$CACHE/build" --target llama-server llama-perplexity -j"$JOBS" >&2

test -x "$BIN"
printf '%s' "${CMAKE_ARGS[*]}" > "$STAMP"
echo "$BIN"
