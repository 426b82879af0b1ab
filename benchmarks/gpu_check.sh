#!/usr/bin/env bash
# make gpu-check: the one-run proof of the GPU path on a CUDA machine (the device tool's H100 / H200:
# no package registry, a few minutes of time). Prepare on the CPU machine first with `make gpu-bundle`
# (wheels and the tokenizer into .gpu/, which the device tool must carry), then on the GPU machine:
#
#     bash benchmarks/gpu_check.sh          # writes gpu_check.log, kernels.xml, engine.xml, gpu_bench.json to $OUT
#
# Steps, each bounded, in order of what fails first: the device and torch/triton; the carried wheels;
# the Triton kernel tests compiled (-x: the first compile error or mismatch stops them); the engine on
# CUDA against transformers (tiny models, fp32; CUDA graphs captured by default) and the graph tests;
# then benchmarks/gpu_bench.py (parity on the default model's shape in fp32 and bf16, kernels against
# SDPA-flash, engine throughput with and without CUDA graphs). Every step's output lands in $OUT as it
# goes; the exit status is 2 when the machine cannot run the check at all, 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${GPU_PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ASYNCLLM_TEST_DEVICE=cuda
step() { echo; echo "=== $1 ($(date +%T))"; }
failed=0

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  || { echo "FAIL: no NVIDIA GPU"; exit 2; }
$PY -c "import torch, triton; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" || exit 2

step "install the carried wheels"
if [ -d .gpu/wheels ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/asyncllm-site \
    .gpu/wheels/*.whl || { echo "FAIL: the wheels in .gpu/wheels do not install"; exit 2; }
  export PYTHONPATH=/tmp/asyncllm-site
else
  echo "note: no .gpu/wheels: run 'make gpu-bundle' on the CPU machine first and carry .gpu"
  echo "      (the CUDA image lacks gguf, msgspec, pydantic, outlines-core, llguidance)"
fi
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}
if [ -d .gpu/tokenizer ]; then export ASYNCLLM_TEST_TOKENIZER=$PWD/.gpu/tokenizer; fi
$PY -c "import asyncllm, asyncllm_kernels; from asyncllm import LLM" || {
  echo "FAIL: asyncllm does not import (a missing package: add it to benchmarks/gpu_bundle.py's PACKAGES)"; exit 2; }

step "Triton kernel tests, compiled"
timeout 150 $PY -m pytest -x -q -p no:cacheprovider -o addopts="" tests/kernels/test_triton_kernels.py \
  --junitxml="$OUT/kernels.xml" || { echo "FAIL: kernel tests"; exit 1; }

step "engine on CUDA against transformers, CUDA graphs"
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels/test_triton_engine.py \
  tests/kernels/test_cuda_graphs.py "tests/engine/test_lora.py::test_triton_kernels_equal_the_c_engine" \
  --junitxml="$OUT/engine.xml" || { echo "FAIL: engine tests"; failed=1; }

step "parity on the default model's shape, kernels against SDPA-flash, throughput"
timeout 240 $PY benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" || { echo "FAIL: gpu_bench"; failed=1; }

step "done: $([ $failed = 0 ] && echo passed || echo FAILED)"
exit $failed
