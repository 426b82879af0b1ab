"""Greedy output that does not depend on how a request was scheduled (issue 26), in bf16 (what
dtype="auto" picks on AVX-512-BF16 CPUs; not on AMX ones, where bf16 keeps oneDNN's tiles) and
fp32, on the default model with the C kernels: tokens and logprobs bit-equal between a request
alone and in a batch of 16 or 64, its prompt whole or chunked at two budgets, its prefix
computed or read from the prefix cache, a run with preemptions (recomputed prompts) against one
without, and n-gram speculative decoding against plain decoding.

Why it holds: every projection reads one panel kernel at every row count (one reduction order
per output: panel_gemm_impl.h, panel_gemm_bf16_impl.h), and prompt attention gives a query row
the bits decode attention gives it (prefill_attention_impl.h); the other ops work row by row."""
from __future__ import annotations

import pytest

from asyncllm import LLM, SamplingParams
from helpers import needs_bf16_c_kernels, needs_c_kernels

pytestmark = needs_c_kernels

GREEDY = SamplingParams(max_tokens=20, temperature=0, logprobs=1, ignore_eos=True)


def _prompts(n: int) -> list[str]:
    """n prompts of 30-75 words from Python's docs (lengths spread over several KV blocks)."""
    import pydoc_data.topics as topics

    texts = [t for t in topics.topics.values() if len(t.split()) > 80]
    return [" ".join(texts[i % len(texts)].split()[i % 7:i % 7 + 30 + 3 * (i % 16)]) for i in range(n)]


def _results(outputs) -> list[tuple[list[int], list[dict]]]:
    """Each request's tokens and, for each, the logprobs (floats: compared with ==) of its top tokens."""
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outputs]


@pytest.fixture(scope="module", params=[pytest.param("bfloat16", marks=needs_bf16_c_kernels), "float32"])
def batched(request):
    """(dtype, 16 prompts, their results in one batch of 16 on a cache-less engine, that engine)."""
    llm = LLM(dtype=request.param, enable_prefix_caching=False, kv_cache_memory=64 << 20, max_num_seqs=64)
    prompts = _prompts(16)
    yield request.param, prompts, _results(llm.generate(prompts, GREEDY, use_tqdm=False)), llm
    llm.engine.shutdown()


def test_alone_and_in_batches_of_16_and_64(batched):
    dtype, prompts, want, llm = batched
    for i in range(0, 16, 3):  # alone: every third, to keep the test short
        assert _results(llm.generate(prompts[i], GREEDY, use_tqdm=False)) == [want[i]], (dtype, i)
    others = _prompts(64)[16:]
    mixed = others[:24] + prompts + others[24:]  # the 16 in the middle of 64 others' rows
    got = _results(llm.generate(mixed, GREEDY, use_tqdm=False))
    assert got[24:40] == want


@pytest.mark.parametrize("budget", [16, 40])
def test_chunked_prompts(batched, budget):
    dtype, prompts, want, _ = batched
    llm = LLM(dtype=dtype, enable_prefix_caching=False, kv_cache_memory=64 << 20, max_num_batched_tokens=budget)
    try:
        assert _results(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
        assert llm.engine.core.num_steps > GREEDY.max_tokens + sum(
            len(llm.get_tokenizer().encode(p)) for p in prompts) // budget  # prompts really ran in chunks
    finally:
        llm.engine.shutdown()


def test_prefix_cache_hits(batched):
    dtype, prompts, want, _ = batched
    llm = LLM(dtype=dtype, enable_prefix_caching=True, kv_cache_memory=64 << 20)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)  # fills the cache
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert all(o.num_cached_tokens >= 16 for o in outputs)
        assert _results(outputs) == want
    finally:
        llm.engine.shutdown()


def test_preemption(batched):
    dtype, prompts, want, reference = batched
    from asyncllm.worker.model_runner import KVCacheSpec

    cfg = reference.engine.core.checkpoint.config
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, reference.engine.core.dtype)
    # 20 blocks of 16 tokens: not enough for 16 requests of 50-110 tokens at once.
    llm = LLM(dtype=dtype, enable_prefix_caching=False, kv_cache_memory=20 * spec.bytes_per_block)
    try:
        assert _results(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
        assert llm.engine.core.scheduler.num_preemptions > 0
    finally:
        llm.engine.shutdown()


def test_speculative_decoding(batched):
    """n-gram proposals verified as decode rows of their sequence: plain decoding's tokens and
    logprobs, bit for bit (in bf16 too), with proposals accepted along the way."""
    dtype, prompts, want, _ = batched
    llm = LLM(dtype=dtype, enable_prefix_caching=False, kv_cache_memory=64 << 20,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    try:
        assert _results(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
        assert llm.engine.core.num_accepted_tokens > 0
    finally:
        llm.engine.shutdown()
