"""quantization="int4": 4-bit copies of the projections read by steps of few rows (CPU).

The quantiser recovers Q4_1 GGUF weights exactly; torch's kernel computes what the codes say (in
bf16); Linear routes by row count; and the engine's decode with it (torch's kernel, or the C
kernels' blocks: tests/kernels/test_block_quant.py) stays close to transformers fp32 (logprobs of
the tokens it picks). Quality on the default model: benchmarks/dtype_parity.py."""
import shutil

import pytest
import torch

import helpers
from asyncllm import LLM, EngineArgs, SamplingParams
from asyncllm.model.default_model import default_model_path
from asyncllm.model.gguf_file import GGUFFile
from asyncllm.model.layers.int4 import (COMPUTE_DTYPE, GROUP_SIZE, Int4Weight, int4_max_rows, int4_supported,
                                        quantize_groups)
from asyncllm.model.layers.block_quant import BlockQuantWeight
from asyncllm.model.layers.linear import Linear

pytestmark = pytest.mark.skipif(not int4_supported(torch.device("cpu")),
                                reason="this torch has no int4 CPU kernel (_weight_int4pack_mm_for_cpu)")


def held_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as torch's 4-bit kernel holds it: (codes - 8) * scale + zero, with scale and zero
    rounded to bf16."""
    q = quantize_groups(weight)
    scale, zero = q.scale.to(COMPUTE_DTYPE).float(), q.zero.to(COMPUTE_DTYPE).float()
    codes = q.codes.reshape(*scale.shape, GROUP_SIZE).float()
    return ((codes - 8) * scale[..., None] + zero[..., None]).reshape(weight.shape)


def test_quantiser_recovers_a_q4_1_weight_exactly():
    """A weight made the way llama.cpp's Q4_1 makes it (codes 0..15 with both ends used, a scale
    and a minimum per group of 32) comes back with the same codes, to fp32 rounding."""
    torch.manual_seed(0)
    rows, cols = 48, 96
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.int32)
    codes[:, ::GROUP_SIZE], codes[:, 1::GROUP_SIZE] = 0, 15  # every group spans the full range, as in Q4_1
    scale = torch.rand(rows, cols // GROUP_SIZE) * 0.01 + 1e-3
    low = torch.randn(rows, cols // GROUP_SIZE) * 0.05
    weight = (codes.reshape(rows, -1, GROUP_SIZE) * scale[..., None] + low[..., None]).reshape(rows, cols)
    q = quantize_groups(weight)
    assert torch.equal(q.codes, codes)
    torch.testing.assert_close(q.dequantize(), weight, atol=1e-6, rtol=0)


def test_quantiser_on_the_default_models_q4_1_tensors():
    """The default model's projections are Q4_1 in its GGUF: re-quantising the dequantised tensor
    loses nothing but fp32 rounding."""
    with GGUFFile(default_model_path()) as gguf:
        assert gguf.tensors["blk.0.ffn_up.weight"].qtype.name == "Q4_1"
        for name in ("blk.0.ffn_up.weight", "blk.7.attn_k.weight"):
            weight = gguf.load(name)
            torch.testing.assert_close(quantize_groups(weight).dequantize(), weight, atol=2e-6, rtol=0)


def test_quantiser_bounds_error_and_handles_constant_groups():
    torch.manual_seed(1)
    weight = torch.randn(32, 64)
    weight[3, :32] = 0.25  # a constant group
    q = quantize_groups(weight)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15
    groups = weight.reshape(32, 2, GROUP_SIZE)
    half_step = ((groups.amax(-1) - groups.amin(-1)) / 30)[..., None]
    assert ((q.dequantize().reshape(32, 2, GROUP_SIZE) - groups).abs() <= half_step + 1e-6).all()
    assert torch.equal(q.dequantize()[3, :32], weight[3, :32])
    with pytest.raises(ValueError, match="in_features % 32"):
        quantize_groups(torch.randn(32, 48))
    with pytest.raises(ValueError, match="out_features % 16"):
        quantize_groups(torch.randn(24, 64))


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_kernel_computes_what_the_codes_say(rows):
    """The kernel's result is x @ W^T for W = the codes with the scale and zero as the kernel holds
    them (bf16), up to the bf16 rounding of its inputs and output."""
    torch.manual_seed(rows)
    dense = torch.randn(80, 128) * 0.05
    weight = Int4Weight.quantize(dense)
    x = torch.randn(rows, 128)
    expected = x.to(COMPUTE_DTYPE).float() @ held_weight(dense).t()
    out = weight.linear(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 80)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=1e-2)
    assert weight.linear(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_linear_reads_the_4bit_copy_only_for_few_rows():
    torch.manual_seed(2)
    layer = Linear(64, 96, bias=True)  # kernels="torch": torch's int4 layout
    layer.pack()
    dense = {rows: layer(torch.ones(rows, 64)) for rows in (1, 4, 5)}
    layer.quantize(4, int4_rows=4)
    for rows in (1, 4):
        x = torch.ones(rows, 64)
        torch.testing.assert_close(layer(x), layer.quantized.linear(x) + layer.bias)
        assert not torch.equal(layer(x), dense[rows])  # it really is the 4-bit copy
        torch.testing.assert_close(layer(x), x @ held_weight(layer.weight).t() + layer.bias, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(layer(torch.ones(5, 64)), dense[5], atol=1e-5, rtol=1e-5)


def test_max_rows_follow_the_model_dtype():
    assert int4_max_rows(torch.bfloat16) == 8
    assert int4_max_rows(torch.float32) == 16


@pytest.mark.parametrize("kernels", ["torch", "cpu"])
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_engine_int4_decode_stays_close_to_transformers_fp32(arch, kernels, tiny_models, tmp_path):
    """A tiny model whose projections are 4-bit already (as the default model's Q4_1 ones are), so
    the 4-bit copies hold the dense weights again and what is left is the kernel's arithmetic:
    torch's in bf16 (kernels="torch"), or the C kernel's in fp32 (kernels="cpu", which also reads
    the logits weight as 8-bit blocks and runs the decode steps as one call). Every projection
    quantised; each greedy token's logprob (4-bit decode steps) against transformers fp32 scoring
    the same sequence."""
    hf = helpers.load_hf(tiny_models(arch))
    with torch.no_grad():
        for module in hf.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(held_weight(module.weight))
    hf.save_pretrained(tmp_path)
    shutil.copy(f"{tiny_models(arch)}/tokenizer.json", tmp_path)
    shutil.copy(f"{tiny_models(arch)}/tokenizer_config.json", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", quantization="int4", kv_cache_memory=16 << 20, kernels=kernels)
    model = llm.engine.core.executor.worker.runner.model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    copy_type, max_rows = (Int4Weight, 16) if kernels == "torch" else (BlockQuantWeight, 8)
    assert layers and all(isinstance(m.quantized, copy_type) and m.quantized_max_rows == max_rows for m in layers)
    assert (model.logits_quant is not None) == (kernels == "cpu")
    for m in layers:  # the 4-bit copy holds the weight itself
        torch.testing.assert_close(held_weight(m.weight), m.weight, atol=1e-6, rtol=0)
        if kernels == "cpu":
            torch.testing.assert_close(m.quantized.dequantize(), m.weight, atol=1e-6, rtol=0)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(text) for text in helpers.TEXT_PROMPTS[:4]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0), use_tqdm=False)
    diffs = []
    with torch.inference_mode():
        for prompt, out in zip(prompts, outs):
            ours = list(out.outputs[0].token_ids)
            logits = hf(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1]
            theirs = torch.log_softmax(logits.float(), -1)
            diffs += [abs(step[t].logprob - theirs[i, t].item())
                      for i, (step, t) in enumerate(zip(out.outputs[0].logprobs, ours))]
    assert len(diffs) == 64
    assert max(diffs) < 0.05, f"max |logprob diff| {max(diffs):.4f}"
    if kernels == "cpu":
        assert model.decode_stack is not None and model.decode_stack.enabled


def test_int4_is_refused_off_the_cpu_and_for_unknown_schemes():
    with pytest.raises(ValueError, match="quantization must be None, 'int4', 'int8', 'gptq'"):
        EngineArgs(quantization="int3").create_engine_config()
    with pytest.raises(ValueError, match="runs on the CPU .* or on the Triton kernels"):
        LLM(device="cuda", kernels="torch", quantization="int4")


def test_default_model_int4_on_the_c_kernels_equals_fp32(default_llm):
    """The default model's file stores its projections as Q4_1 and its embedding as Q8_0, so the C
    kernels' 4- and 8-bit blocks hold the fp32 weights exactly: the same tokens as the dense fp32
    engine, and logprobs within 1e-4 (helpers.check_same_as_reference_engine)."""
    if default_llm.engine.core.config.kernels != "cpu":
        pytest.skip("the C kernels do not build here")
    llm = LLM(dtype="float32", quantization="int4", kv_cache_memory=64 << 20)
    model = llm.engine.core.executor.worker.runner.model
    assert all(isinstance(p.quantized, BlockQuantWeight) and p.quantized.exact for p in model.projections())
    assert model.logits_quant is not None and model.logits_quant.exact
    helpers.check_same_as_reference_engine(llm, default_llm)
