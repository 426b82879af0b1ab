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


def test_triton_engine_runs_gptq_and_fp8_checkpoints_from_their_blocks(tiny_models, tmp_path):
    """On the Triton kernels a GPTQ or FP8 checkpoint keeps only its codes, as the C kernels' block
    layout, read by asyncllm_kernels.block_linear for every step (prompts and decodes alike; no
    dense weight): transformers' greedy ids and logprobs on the weights the checkpoint stands for."""
    from asyncllm.model.layers.block_quant import BlockQuantWeight
    from quant_packers import check_checkpoint, pack_gptq, write_fp8, write_quantized

    def from_blocks(bits):
        def check(llm):
            projections = llm.engine.core.executor.worker.runner.model.projections()
            assert all(p.dense_dropped and isinstance(p.quantized, BlockQuantWeight) and p.quantized.bits == bits
                       for p in projections)
        return check

    dense = tiny_models("LlamaForCausalLM")
    gptq = write_quantized(dense, tmp_path / "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                                      "desc_act": False, "sym": False},
                           lambda name, w: pack_gptq(w, 4, 32, False, False, seed=len(name)))
    check_checkpoint(tmp_path / "gptq", dense, gptq, check=from_blocks(4), max_tokens=12, dtype="float32",
                     device=DEVICE, kernels="triton")
    fp8 = write_fp8(dense, tmp_path / "fp8", (32, 32))
    check_checkpoint(tmp_path / "fp8", dense, fp8, check=from_blocks(9), max_tokens=12, dtype="float32",
                     device=DEVICE, kernels="triton")


def test_triton_engine_quantizes_to_blocks(tiny_models):
    """quantization="int8" on the Triton kernels with only the blocks kept: the engine's greedy
    tokens equal transformers' on the weights the blocks hold (the logits stay dense there)."""
    import torch

    from asyncllm.model.layers.block_quant import BlockQuantWeight

    path = tiny_models("LlamaForCausalLM")
    llm = LLM(path, dtype="float32", device=DEVICE, kernels="triton", quantization="int8",
              quantized_weights_only=True, kv_cache_memory=16 << 20, max_num_batched_tokens=20)
    try:
        model = llm.engine.core.executor.worker.runner.model
        assert all(p.dense_dropped for p in model.projections()) and model.logits_quant is None
        hf = helpers.load_hf(path)
        with torch.no_grad():
            for name, module in hf.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    module.weight = torch.nn.Parameter(BlockQuantWeight.quantize(module.weight.float(), 8).dequantize())
        helpers.check_mixed_steps_match_transformers(llm, hf, max_tokens=12)
    finally:
        llm.engine.shutdown()
