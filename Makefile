# rerank: `make demo` and `make test` are all a newcomer needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint bench parity gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,eval,ray]'
	touch $(STAMP)

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check rerank_cli tests benchmarks examples

bench: install
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/bench_parallel.py
	$(BIN)/python benchmarks/bench_ray.py
	$(BIN)/python benchmarks/bench_windows.py
	$(BIN)/python benchmarks/bench_prefix.py
	$(BIN)/python benchmarks/bf16_ties.py

parity: install
	$(BIN)/python benchmarks/parity.py

# The GPU check (benchmarks/gpu_check.py): pytest -m gpu, benchmarks on real shapes, reports in GPU_OUT.
# With GPU_PY set it runs on that interpreter and installs nothing (a lent GPU machine has no network):
#   make gpu-check GPU_PY=python3 GPU_OUT=$OUT
GPU_OUT ?= gpu-check-out
GPU_PY ?=
gpu-check: $(if $(GPU_PY),,install)
	$(if $(GPU_PY),$(GPU_PY),$(BIN)/python) benchmarks/gpu_check.py $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf $(VENV) demo bench-out gpu-check-out .pytest_cache
