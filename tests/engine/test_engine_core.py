"""Engine core behaviour on the default model: every optimisation changes speed, never tokens."""
import pytest

import helpers
from asyncllm import LLM, SamplingParams
from asyncllm.errors import PromptTooLongError
from asyncllm.sampling_params import RequestOutputKind

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def _texts(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _pydoc_prompts(n: int, words: int = 60) -> list[str]:
    import pydoc_data.topics as topics

    texts = [t for t in topics.topics.values() if len(t.split()) > words]
    return [" ".join(texts[i % len(texts)].split()[:words]) for i in range(n)]


def test_batch_of_64_equals_each_alone(default_llm):
    prompts = _pydoc_prompts(64, words=20)
    batched = default_llm.generate(prompts, GREEDY, use_tqdm=False)
    alone = [default_llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts]
    assert _texts(batched) == _texts(alone)
    assert [o.outputs[0].text for o in batched] == [o.outputs[0].text for o in alone]


def test_chunked_prefill_on_and_off_give_equal_tokens():
    prompts = _pydoc_prompts(6, words=120)
    params = SamplingParams(max_tokens=12, temperature=0)
    whole = LLM(dtype="float32", enable_chunked_prefill=False, max_num_batched_tokens=2048,
                enable_prefix_caching=False).generate(prompts, params, use_tqdm=False)
    chunked_llm = LLM(dtype="float32", max_num_batched_tokens=48, enable_prefix_caching=False)
    chunked = chunked_llm.generate(prompts, params, use_tqdm=False)
    assert _texts(whole) == _texts(chunked)
    assert chunked_llm.engine.core.num_steps > 12 + len(prompts)  # prompts really ran in chunks


def test_prefix_cache_hit_counts_and_keeps_output():
    llm = LLM(dtype="float32")
    shared = _pydoc_prompts(1, words=150)[0]
    first = llm.generate(shared + " First question:", GREEDY, use_tqdm=False)[0]
    stats_before = llm.engine.core.stats()
    again = llm.generate(shared + " First question:", GREEDY, use_tqdm=False)[0]
    other = llm.generate(shared + " Second question:", GREEDY, use_tqdm=False)[0]
    stats = llm.engine.core.stats()
    assert stats.prefix_cache_hits - stats_before.prefix_cache_hits >= 2 * (len(first.prompt_token_ids) // 16 - 1) * 16
    assert again.num_cached_tokens > 0 and other.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    uncached = LLM(dtype="float32", enable_prefix_caching=False)
    assert uncached.generate(shared + " Second question:", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        other.outputs[0].token_ids
    # LLM.reset_prefix_cache (vLLM's name) forgets them: the same prompt is computed whole again.
    assert llm.reset_prefix_cache()
    after_reset = llm.generate(shared + " First question:", GREEDY, use_tqdm=False)[0]
    assert after_reset.num_cached_tokens == 0 and after_reset.outputs[0].token_ids == first.outputs[0].token_ids


def test_a_continued_prompt_copies_the_cached_partial_block(tiny_models):
    """A finished request's last, partial block stays findable by its tokens: a prompt that
    continues it (a beam's next step, the next turn of a chat) copies it into a block of its own
    (copy-on-write) and computes only what follows; the tokens are those of an uncached engine."""
    path = tiny_models("Qwen3ForCausalLM")
    llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20)
    base = list(range(200, 237))  # 2 full blocks + 5 tokens
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=1)
    first = llm.generate({"prompt_token_ids": base}, params, use_tqdm=False)[0]
    pool = llm.engine.core.kv.pool
    assert len(pool._partial) == 1  # its last block: 5 prompt tokens + 5 generated ones computed
    continued = base + list(first.outputs[0].token_ids[:5]) + [7, 8]
    second = llm.generate({"prompt_token_ids": continued}, params, use_tqdm=False)[0]
    assert second.num_cached_tokens == 32 + 10  # two full blocks and the copied partial one
    pool.check_invariants()
    fresh = LLM(path, dtype="float32", kv_cache_memory=16 << 20, enable_prefix_caching=False)
    try:
        want = fresh.generate({"prompt_token_ids": continued}, params, use_tqdm=False)[0]
    finally:
        fresh.engine.shutdown()
        llm.engine.shutdown()
    assert second.outputs[0].token_ids == want.outputs[0].token_ids
    for token, a, b in zip(want.outputs[0].token_ids, second.outputs[0].logprobs, want.outputs[0].logprobs):
        assert abs(a[token].logprob - b[token].logprob) < 1e-4


def test_tiny_kv_cache_forces_preemption_with_equal_outputs(default_llm):
    prompts = _pydoc_prompts(8, words=40)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = default_llm.generate(prompts, params, use_tqdm=False)
    # 48 blocks of 16 tokens: not enough for 8 requests of ~100 tokens at once.
    from asyncllm.worker.model_runner import KVCacheSpec

    cfg = default_llm.engine.core.checkpoint.config
    block_bytes = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, default_llm.engine.core.dtype)
    small = LLM(dtype="float32", kv_cache_memory=48 * block_bytes.bytes_per_block)
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.core.scheduler.num_preemptions > 0
    assert _texts(got) == _texts(expected)
    assert small.engine.core.kv.num_used_blocks() == 0


def test_seeded_sampling_is_reproducible_and_independent_of_batch(default_llm):
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = default_llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].text
    again = default_llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].text
    noise = SamplingParams(max_tokens=24, temperature=1.0)
    batch = default_llm.generate(["Hello", "Once upon a time", "The weather", "Numbers:"],
                                 [noise, seeded, noise, noise], use_tqdm=False)
    assert alone == again == batch[1].outputs[0].text
    other_seed = default_llm.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=1.0, seed=99),
                                      use_tqdm=False)[0].outputs[0].text
    assert other_seed != alone


def test_n_samples_share_prompt_blocks_and_differ(default_llm):
    engine = default_llm.engine
    prompt = _pydoc_prompts(1, words=80)[0]
    engine.add_request("n4", prompt, SamplingParams(n=4, max_tokens=16, temperature=1.0, seed=5))
    shared_seen = False
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.finished else final
        blocks = [b for b in engine.core.kv.pool.blocks if b.ref_cnt >= 2]
        shared_seen |= bool(blocks)
    assert shared_seen
    assert final is not None and len(final.outputs) == 4
    assert sorted(c.index for c in final.outputs) == [0, 1, 2, 3]
    assert len({c.text for c in final.outputs}) > 1
    assert engine.core.kv.num_used_blocks() == 0


def test_stop_string_spanning_tokens(default_llm):
    tok = default_llm.get_tokenizer()
    base = default_llm.generate("def fibonacci(n):", SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    pieces = [tok.decode(base.outputs[0].token_ids[:i]) for i in range(len(base.outputs[0].token_ids) + 1)]
    # A stop string made of the end of one token and the start of the next.
    k = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) - len(pieces[i - 1]) >= 2
             and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = pieces[k + 1][len(pieces[k]) - 2:len(pieces[k]) + 2]
    assert stop not in pieces[k]
    out = default_llm.generate("def fibonacci(n):", SamplingParams(max_tokens=24, temperature=0, stop=[stop]),
                               use_tqdm=False)[0].outputs[0]
    full = base.outputs[0].text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]
    kept = default_llm.generate("def fibonacci(n):", SamplingParams(max_tokens=24, temperature=0, stop=[stop],
                                                                    include_stop_str_in_output=True),
                                use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:full.index(stop) + len(stop)]


def test_streamed_deltas_hold_back_stop_prefixes(default_llm):
    engine = default_llm.engine
    base = default_llm.generate("The quick brown fox", SamplingParams(max_tokens=20, temperature=0),
                                use_tqdm=False)[0].outputs[0].text
    stop = base[len(base) // 2:len(base) // 2 + 3]
    params = SamplingParams(max_tokens=20, temperature=0, stop=[stop], output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta", "The quick brown fox", params)
    deltas = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.extend(c.text for c in out.outputs)
            for c in out.outputs:
                assert stop not in "".join(deltas)
    assert "".join(deltas) == base[:base.index(stop)]


def test_cjk_and_emoji_deltas_have_no_replacement_chars(default_llm):
    engine = default_llm.engine
    tok = default_llm.get_tokenizer()
    prompts = ["日本の首都は東京です。中国の首都は", "Emoji story: 🐶🐱🐭🐹🐰🦊🐻", "Ελληνικά: Καλημέρα κόσμε, "]
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        engine.add_request(f"utf8-{i}", prompt, params)
        deltas, tokens = [], []
        while engine.has_unfinished_requests():
            for out in engine.step():
                for c in out.outputs:
                    deltas.append(c.text)
                    tokens.extend(c.token_ids)
        text = "".join(deltas)
        assert all("\ufffd" not in d for d in deltas)
        decoded = tok.decode(tokens, skip_special_tokens=True)
        # max_tokens may cut a character's bytes: the engine never shows that partial char as U+FFFD.
        assert text == decoded.removesuffix("\ufffd") and "\ufffd" not in text
        assert any(ord(ch) > 0x7F for ch in text), text  # the model really produced multi-byte chars


def test_cumulative_outputs_grow_and_final_only_arrives_once(default_llm):
    engine = default_llm.engine
    engine.add_request("cum", "Hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.add_request("fin", "Hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                      output_kind=RequestOutputKind.FINAL_ONLY))
    seen = {"cum": [], "fin": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    lengths = [len(o.outputs[0].token_ids) for o in seen["cum"]]
    assert lengths == list(range(1, 7))
    assert len(seen["fin"]) == 1 and seen["fin"][0].finished
    assert seen["fin"][0].outputs[0].token_ids == seen["cum"][-1].outputs[0].token_ids
    m = seen["fin"][0].metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


def test_priority_orders_admission(default_llm):
    llm = LLM(dtype="float32", max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(max_tokens=2, temperature=0)
    for name, prio in [("low", 5), ("high", -1), ("mid", 0)]:
        engine.add_request(name, "Hello", params, priority=prio)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "mid", "low"]


def test_prompt_too_long_fails_at_once():
    llm = LLM(dtype="float32", max_model_len=64)
    with pytest.raises(PromptTooLongError, match="max_model_len is 64"):
        llm.generate(" ".join(["word"] * 100), GREEDY, use_tqdm=False)
    from asyncllm.worker.model_runner import KVCacheSpec

    core = llm.engine.core
    cfg = core.checkpoint.config
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, core.dtype)
    tiny = LLM(dtype="float32", kv_cache_memory=4 * spec.bytes_per_block)  # 64 tokens of cache
    assert tiny.engine.max_model_len == 64
    with pytest.raises(PromptTooLongError):
        tiny.generate(" ".join(["word"] * 100), GREEDY, use_tqdm=False)
    assert not tiny.engine.has_unfinished_requests()


def test_generation_stops_at_max_model_len():
    llm = LLM(dtype="float32", max_model_len=40)
    out = llm.generate("Count: 1 2 3 4", SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40


def test_prompt_logprobs_match_transformers(tiny_models):
    import torch

    path = tiny_models("Qwen2ForCausalLM")
    hf = helpers.load_hf(path)
    llm = LLM(path, dtype="float32", kv_cache_memory=8 << 20, max_num_batched_tokens=7)
    ids = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    ref = torch.log_softmax(logits, dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-3)
        assert len(entry) >= 2


def test_generate_keeps_input_order_and_accepts_token_ids(default_llm):
    tok = default_llm.get_tokenizer()
    prompts = ["Short", "A much longer prompt that takes more steps to prefill than the others", "Mid size one"]
    outs = default_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    by_ids = default_llm.generate([tok.encode(p) for p in prompts], GREEDY, use_tqdm=False)
    assert _texts(by_ids) == _texts(outs)
    chats = default_llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]], GREEDY,
                             use_tqdm=False)
    assert len(chats) == 2 and all(c.outputs[0].text for c in chats)
