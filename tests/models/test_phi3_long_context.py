"""Phi-3's LongRoPE past its original context. transformers runs a sequence on the short factors
while it fits `original_max_position_embeddings` (64 for the tiny model) and on the long factors
once it is longer, recomputing the whole sequence at the switch; asyncllm recomputes the request
there too (its K/V keyed by the factors in the prefix cache), so every step equals transformers."""
import pytest

import helpers
from asyncllm import LLM, SamplingParams

pytestmark = pytest.mark.timeout(300)


def _prompts(tok) -> list[list[int]]:
    words = tok.encode(" ".join(helpers.TEXT_PROMPTS * 8))
    # Crosses 64 while decoding; exactly the original context (the first sampled token crosses); longer
    # than it from the start.
    return [words[:40], words[3:67], words[5:95]]


def test_past_the_original_context_matches_transformers(tiny_models):
    path = tiny_models("Phi3ForCausalLM")
    hf = helpers.load_hf(path)
    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    try:
        assert llm.engine.max_model_len == 512  # the long factors' range, not the original 64
        prompts = _prompts(llm.get_tokenizer())
        assert len(prompts[1]) == 64 and len(prompts[2]) > 64
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        expected = []
        for prompt, out in zip(prompts, outputs):
            hf_tokens, hf_logits = helpers.hf_greedy(hf, prompt, 40)
            assert out.outputs[0].token_ids == hf_tokens
            helpers.check_logprobs(out.outputs[0], hf_logits)
            expected.append(hf_tokens)
        # Again: the prefix cache serves each prompt's blocks computed on its own factors only.
        again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
        assert all(o.num_cached_tokens > 0 for o in again)
    finally:
        llm.engine.shutdown()
    # Prompt chunks of 16 tokens and n-gram speculation (proposals never verified across the switch).
    chunked = LLM(path, dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=16,
                  speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1})
    try:
        outputs = chunked.generate([{"prompt_token_ids": p} for p in prompts],
                                   SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    finally:
        chunked.engine.shutdown()
