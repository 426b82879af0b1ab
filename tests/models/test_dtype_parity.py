"""Every dtype against transformers in fp32 (tiny Llama): bf16/fp16 may pick other greedy tokens,
so the check is teacher-forced: transformers' fp32 continuation fed back as the prompt, each
token's logprob under the dtype (prompt_logprobs) close to fp32's. fp32 itself is exact-greedy
(test_parity.py). The default model's figures for every dtype: benchmarks/dtype_parity.py."""
import pytest
import torch

import helpers
from asyncllm import LLM, SamplingParams


@pytest.mark.parametrize("dtype,tolerance", [("bfloat16", 0.15), ("float16", 0.03)])
def test_low_precision_logprobs_close_to_fp32(dtype, tolerance, tiny_models):
    path = tiny_models("LlamaForCausalLM")
    hf = helpers.load_hf(path)
    llm = LLM(path, dtype=dtype, kv_cache_memory=16 << 20)
    assert llm.engine.core.dtype == getattr(torch, dtype)
    tok = llm.get_tokenizer()
    diffs = []
    for text in helpers.TEXT_PROMPTS[:4]:
        prompt = tok.encode(text)
        new, logits = helpers.hf_greedy(hf, prompt, 16)
        scored = llm.generate({"prompt_token_ids": prompt + new}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)[0]
        for i, (token, step_logits) in enumerate(zip(new, logits)):
            reference = torch.log_softmax(step_logits.float(), -1)[token].item()
            diffs.append(abs(scored.prompt_logprobs[len(prompt) + i][token].logprob - reference))
    assert len(diffs) == 64
    assert max(diffs) < tolerance, f"{dtype}: max |logprob diff| {max(diffs):.4f}"
