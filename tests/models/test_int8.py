"""quantization="int8": Q8_0 blocks of the projections and the logits weight, read by the C kernels
in decode steps of few rows (CPU).

The kernel and the blocks themselves are tested in tests/kernels/test_block_quant.py, the decode
stack against the per-op path with them in tests/kernels/test_cpu_decode_stack.py. Here: which
weights get which copy for how many rows, the engine's decode against transformers fp32 on weights
that are not 8-bit (so the copies are lossy), and clear errors where the setting cannot run.
Quality on the default model: benchmarks/dtype_parity.py."""
import pytest
import torch

import helpers
from asyncllm import LLM, SamplingParams
from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.block_quant import BF16_MAX_ROWS, MAX_ROWS, BlockQuantWeight
from asyncllm.model.layers.linear import Linear

pytestmark = pytest.mark.skipif(cpu_kernels.build_error() is not None, reason="the C kernels do not build here")


def _greedy_logprob_diffs(llm, hf, prompts: list[list[int]], max_tokens: int) -> list[float]:
    """|logprob of each greedy token| ours vs transformers fp32 scoring the same sequence."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    diffs = []
    with torch.inference_mode():
        for prompt, out in zip(prompts, outs):
            ours = list(out.outputs[0].token_ids)
            theirs = torch.log_softmax(hf(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1].float(), -1)
            diffs += [abs(step[t].logprob - theirs[i, t].item())
                      for i, (step, t) in enumerate(zip(out.outputs[0].logprobs, ours))]
    assert len(diffs) == len(prompts) * max_tokens
    return diffs


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_engine_int8_decode_stays_close_to_transformers_fp32(arch, tiny_models):
    """Random fp32 weights (not on any 8-bit grid): every projection and the logits weight get
    lossy Q8_0 blocks, decode steps of 1-4 sequences read them inside the one-call decoder, and the
    greedy tokens' logprobs stay as close to transformers fp32 (on the same sequences) as the dense
    bf16 engine's do: measured on the tiny models, int8 max 0.026-0.050 / mean 0.009-0.011, dense
    bf16 max 0.024-0.065 / mean 0.007-0.009, dense fp32 < 1e-4."""
    path = tiny_models(arch)
    llm = LLM(path, dtype="float32", quantization="int8", kv_cache_memory=16 << 20, kernels="cpu")
    model = llm.engine.core.executor.worker.runner.model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and all(isinstance(m.quantized, BlockQuantWeight) and m.quantized.bits == 8
                          and m.quantized_max_rows == MAX_ROWS and not m.quantized.exact for m in layers)
    assert model.logits_quant is not None and model.logits_quant.bits == 8
    assert model.logits_quant_max_rows == MAX_ROWS
    tok = llm.get_tokenizer()
    prompts = [tok.encode(text) for text in helpers.TEXT_PROMPTS[:4]]
    diffs = _greedy_logprob_diffs(llm, helpers.load_hf(path), prompts, max_tokens=16)
    assert max(diffs) < 0.08 and sum(diffs) / len(diffs) < 0.02, f"max {max(diffs):.4f}"
    assert model.decode_stack is not None and model.decode_stack.enabled
    # The copies really are what decode steps read: without them the same steps give other bits.
    dense = LLM(path, dtype="float32", kv_cache_memory=16 << 20, kernels="cpu")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    ours, theirs = (e.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0] for e in (llm, dense))
    assert [s[t].logprob for s, t in zip(ours.outputs[0].logprobs, ours.outputs[0].token_ids)] != \
        [s[t].logprob for s, t in zip(theirs.outputs[0].logprobs, theirs.outputs[0].token_ids)]


def test_bf16_model_reads_8bit_blocks_up_to_four_rows(tiny_models):
    """bf16 models read the blocks (bf16 activations, fp32 arithmetic) in steps of 1-4 rows, where
    they beat oneDNN's packed bf16 weights, and the dense weights above; greedy logprobs stay
    near transformers fp32 (measured: max 0.034-0.045, mean 0.011-0.014 on the tiny models)."""
    path = tiny_models("LlamaForCausalLM")
    llm = LLM(path, dtype="bfloat16", quantization="int8", kv_cache_memory=16 << 20, kernels="cpu")
    model = llm.engine.core.executor.worker.runner.model
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m.quantized, BlockQuantWeight) and m.quantized_max_rows == BF16_MAX_ROWS for m in layers)
    assert model.logits_quant is not None and model.logits_quant_max_rows == BF16_MAX_ROWS
    x = torch.randn(BF16_MAX_ROWS + 1, layers[0].in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        few, many = layers[0](x[:BF16_MAX_ROWS]), layers[0](x)
        assert torch.equal(few, layers[0].quantized.linear(x[:BF16_MAX_ROWS]) if layers[0].bias is None
                           else layers[0].quantized.linear(x[:BF16_MAX_ROWS]) + layers[0].bias)
        assert not torch.equal(many[:BF16_MAX_ROWS], few)  # five rows: the dense weight
    tok = llm.get_tokenizer()
    prompts = [tok.encode(text) for text in helpers.TEXT_PROMPTS[:3]]
    diffs = _greedy_logprob_diffs(llm, helpers.load_hf(path), prompts, max_tokens=8)
    assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.025, f"max {max(diffs):.4f}"


def test_int8_needs_the_c_kernels():
    with pytest.raises(ValueError, match="quantization='int8' reads 8-bit blocks with the C kernels"):
        LLM(kernels="torch", quantization="int8")
    with pytest.raises(ValueError, match="quantization must be None, 'int4', 'int8', 'gptq'"):
        LLM(quantization="int16")


def test_default_model_int8_stays_close_to_fp32(default_llm):
    """The default model's weights are Q4_1 / Q8_0 in its file; Q8_0 blocks of its Q4_1 projections
    round most of them (a scale of max|w| / 127 instead of the file's own grid), so this is the
    lossy case on real weights. Measured with benchmarks/dtype_parity.py (8 prompts x 32 tokens):
    as far from fp32 as dense bf16 is (|Δ logprob| mean 0.01, max 0.13; bf16 0.02 / 0.18). Here:
    each prompt's greedy tokens follow the dense fp32 engine's for at least 8 steps, and while
    they do, every logprob stays within 0.15 of fp32's."""
    if default_llm.engine.core.config.kernels != "cpu":
        pytest.skip("the C kernels do not build here")
    llm = LLM(dtype="float32", quantization="int8", kv_cache_memory=64 << 20)
    model = llm.engine.core.executor.worker.runner.model
    assert all(isinstance(p.quantized, BlockQuantWeight) and p.quantized.bits == 8 for p in model.projections())
    assert model.logits_quant is not None and model.logits_quant.exact  # the embedding is Q8_0 in the file
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": tok.encode(text)} for text in helpers.TEXT_PROMPTS[:3]]
    ours, dense = (e.generate(prompts, params, use_tqdm=False) for e in (llm, default_llm))
    for a, b in zip(ours, dense):
        ids_a, ids_b = a.outputs[0].token_ids, b.outputs[0].token_ids
        shared = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), len(ids_a))
        assert shared >= 8, (ids_a, ids_b)
        for step_a, step_b, t in list(zip(a.outputs[0].logprobs, b.outputs[0].logprobs, ids_a))[:shared]:
            assert abs(step_a[t].logprob - step_b[t].logprob) < 0.15
