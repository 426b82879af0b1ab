"""The whole engine on the Triton kernels (under Triton's interpreter without a GPU) against
transformers: greedy ids equal, logprobs close, with prompt chunks, prefix-cache hits,
decodes sharing steps, Mistral's sliding window, Mixtral's experts (the fused_moe kernel) and
Gemma 3's sliding and global layers."""
import os

import pytest

import helpers
from asyncllm import LLM

DEVICE = os.environ.get("ASYNCLLM_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM",
                                  "Gemma3ForCausalLM"])
def test_triton_kernels_engine_matches_transformers(arch, tiny_models):
    path = tiny_models(arch)
    hf = helpers.load_hf(path)
    # 20-token chunks: the 30-token prompts take two steps and share them with other requests' decodes.
    llm = LLM(path, dtype="float32", device=DEVICE, kernels="triton", kv_cache_memory=16 << 20,
              max_num_batched_tokens=20)
    assert llm.engine.core.config.kernels == "triton"
    prompts = helpers.check_mixed_steps_match_transformers(llm, hf)
    if arch == "MistralForCausalLM":
        assert max(len(p) for p in prompts) + 24 > llm.engine.core.checkpoint.config.sliding_window
    if arch == "MixtralForCausalLM":
        block = llm.engine.core.executor.worker.model.layers[0].mlp
        assert block.triton and block._stacked is not None  # the experts ran on the Triton kernel


def test_triton_kernels_refused_on_cpu_without_interpreter(monkeypatch):
    from asyncllm.config import EngineArgs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        EngineArgs(device="cpu", kernels="triton").create_engine_config()
    assert EngineArgs(device="cpu", kernels="auto").create_engine_config().kernels in ("cpu", "torch")
    with pytest.raises(ValueError, match="kernels must be"):
        EngineArgs(device="cpu", kernels="cuda-graphs").create_engine_config()
