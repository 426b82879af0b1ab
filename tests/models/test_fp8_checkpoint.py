"""FP8 checkpoints (quant_method "fp8"): float8_e4m3fn weights with block scales (weight_scale_inv)
or per-row scales (weight_scale, with static input scales beside), written here as the format
says, run from their e4m3 codes on the C kernels (dequantised elsewhere) and equal transformers on
the weights they stand for; and quantization="fp8" of a dense checkpoint (e4m3 blocks, a scale per
32 inputs) against transformers on weights quantised by that rule here."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from asyncllm import LLM
from asyncllm.model.layers.block_quant import BlockQuantWeight
from asyncllm.model.layers.int4 import FP8_BITS
from quant_packers import check_checkpoint, write_fp8


FP8_MAX = 448.0  # e4m3fn's largest finite value


def runs_from_e4m3_blocks(exact: bool):
    def check(llm) -> None:  # no dense copy: e4m3 codes in the C kernels' blocks
        projections = llm.engine.core.executor.worker.runner.model.projections()
        assert all(p.dense_dropped and isinstance(p.quantized, BlockQuantWeight) and p.quantized.bits == FP8_BITS
                   and p.quantized.exact == exact for p in projections)
    return check


def runs_dense(llm) -> None:
    assert not any(p.dense_dropped for p in llm.engine.core.executor.worker.runner.model.projections())


@helpers.needs_c_kernels
@pytest.mark.parametrize("block", [(32, 32), (16, 64), None])
def test_fp8_checkpoint_runs_from_its_codes(tiny_models, tmp_path, block):
    """Per-row and block scales (whole groups of 32 inputs) → e4m3 blocks holding the checkpoint's
    weights exactly (dtype auto: float32, what the blocks compute in; decode steps in the one-call
    decoder, prompts through the panel GEMM unpacking the blocks)."""
    dense = tiny_models("LlamaForCausalLM")
    weights = write_fp8(dense, tmp_path / "fp8", block)
    check_checkpoint(tmp_path / "fp8", dense, weights, check=runs_from_e4m3_blocks(exact=True), quantization="fp8")


@pytest.mark.parametrize("block", [(32, 32), (16, 16)])
def test_fp8_checkpoint_runs_dequantised_where_blocks_do_not_serve(tiny_models, tmp_path, block):
    """The torch kernels, or scale blocks that cut the 32-input groups: the dense dequantised weights."""
    dense = tiny_models("LlamaForCausalLM")
    weights = write_fp8(dense, tmp_path / "fp8", block)
    kernels = "torch" if block == (32, 32) else "auto"
    check_checkpoint(tmp_path / "fp8", dense, weights, check=runs_dense, dtype="float32", kernels=kernels)


def fp8_per_group(weight: torch.Tensor) -> torch.Tensor:
    """quantization="fp8"'s rule, written from its definition: per row and 32 inputs, scale =
    max |w| / 448 and w ≈ e4m3(w / scale) * scale (round to nearest even)."""
    groups = weight.float().reshape(weight.shape[0], -1, 32)
    scale = groups.abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((groups / scale).to(torch.float8_e4m3fn).float() * scale).reshape(weight.shape)


@helpers.needs_c_kernels
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_fp8_quantization_of_a_dense_checkpoint_matches_transformers(tiny_models, arch):
    """vLLM's quantization="fp8" on a dense checkpoint: weight-only e4m3 blocks (the CPU has no fp8
    matmul), only the blocks kept. Every projection's blocks hold exactly the weights the rule gives
    (fp8_per_group, written here), and the engine gives transformers' greedy ids and logprobs on
    those weights, with the logits weight as its Q8_0 copy (what decode steps read, as under int4 /
    int8), through prompt chunks, mixed steps and the one-call decoder."""
    dense = tiny_models(arch)
    llm = LLM(dense, quantization="fp8", quantized_weights_only=True, kv_cache_memory=16 << 20,
              max_num_batched_tokens=20)
    reference = LLM(dense, dtype="float32", kv_cache_memory=16 << 20)
    try:
        runs_from_e4m3_blocks(exact=False)(llm)
        ours = dict(llm.engine.core.executor.worker.runner.model.named_modules())
        dense_projections = [(name, m) for name, m in reference.engine.core.executor.worker.runner.model.named_modules()
                             if hasattr(m, "prepacked") and getattr(m, "quantized", None) is None]
        assert dense_projections
        for name, module in dense_projections:
            assert torch.equal(ours[name].quantized.dequantize(), fp8_per_group(module.dense_weight())), name
        hf = helpers.load_hf(dense)
        with torch.no_grad():  # a new parameter each: unties lm_head from the embedding
            for name, module in hf.named_modules():
                if isinstance(module, torch.nn.Linear):
                    weight = module.weight.float()
                    module.weight = torch.nn.Parameter(BlockQuantWeight.quantize(weight, 8).dequantize()
                                                       if name == "lm_head" else fp8_per_group(weight))
        helpers.check_mixed_steps_match_transformers(llm, hf)
    finally:
        llm.engine.shutdown()
        reference.engine.shutdown()


def test_fp8_quantization_needs_the_c_kernels_and_a_missing_scale_is_refused(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"fp8 \(e4m3\) copies need the C kernels"):
        LLM(tiny_models("LlamaForCausalLM"), quantization="fp8", kernels="torch", kv_cache_memory=16 << 20)
    write_fp8(tiny_models("LlamaForCausalLM"), tmp_path / "fp8", (32, 32))
    state = load_file(tmp_path / "fp8" / "model.safetensors")
    del state["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(state, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(ValueError, match="o_proj' has no weight_scale_inv"):
        LLM(str(tmp_path / "fp8"), kv_cache_memory=16 << 20)
