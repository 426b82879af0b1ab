"""Speculative decoding, method ngram (prompt lookup): configured as vLLM's speculative_config;
proposals verified in one forward, so the tokens are those of plain decoding."""
import pytest

from asyncllm import LLM, EngineArgs, SamplingParams
from asyncllm.spec_decode.ngram import propose_from

PASSAGE = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks "
           "were striking thirteen. Call me Ishmael. Some years ago, never mind how long precisely, having "
           "little or no money in my purse, I thought I would sail about a little and see the watery part of "
           "the world.")


def test_propose_from_finds_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose_from(tokens, 3, 1, 3) == [7, 8, 5]  # the latest earlier "1 2 3" was followed by 7 8 5
    assert propose_from(tokens, 1, 1, 3) == [7]
    assert propose_from([4, 5, 6], 3, 1, 3) == []  # no earlier occurrence of any suffix
    assert propose_from([5, 5], 4, 1, 2) == [5]  # what follows the match, up to the end of the context
    assert propose_from(tokens, 0, 1, 3) == []


@pytest.fixture(scope="module")
def ngram_llm():
    llm = LLM(dtype="float32", max_num_seqs=64,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    yield llm
    llm.engine.shutdown()


def test_ngram_gives_the_tokens_of_plain_decoding_in_fewer_forwards(default_llm, ngram_llm):
    tok = default_llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Repeat this text exactly:\n{PASSAGE}"}],
                                       tokenize=False, add_generation_prompt=True),
               "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
               "Once upon a time"]
    params = [SamplingParams(max_tokens=48, temperature=0, logprobs=1),
              SamplingParams(max_tokens=48, temperature=0.8, seed=5)]
    for p in params:
        core = ngram_llm.engine.core
        accepted = core.num_accepted_tokens
        got = ngram_llm.generate(prompts, p, use_tqdm=False)
        want = default_llm.generate(prompts, p, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        assert core.num_accepted_tokens > accepted
        if p.logprobs is not None:  # verified rows attend as decode rows: the logprobs of plain decoding
            for g, w in zip(got, want):
                pairs = zip(g.outputs[0].logprobs, w.outputs[0].logprobs, g.outputs[0].token_ids)
                assert max(abs(x[t].logprob - y[t].logprob) for x, y, t in pairs) < 1e-4
    steps = ngram_llm.engine.core.num_steps
    copy = ngram_llm.generate(prompts[:1], SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    # Copying the passage: most proposals hold, so far fewer forwards than tokens (measured: 7 for 27).
    assert ngram_llm.engine.core.num_steps - steps < len(copy[0].outputs[0].token_ids) / 2
    assert ngram_llm.engine.core.kv.num_used_blocks() == 0


def test_disable_by_batch_size_defaults_to_the_measured_crossover():
    from asyncllm.spec_decode.config import DEFAULT_DISABLE_BY_BATCH_SIZE, SpeculativeConfig

    assert SpeculativeConfig.parse({"method": "ngram"}).disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE == 6
    assert SpeculativeConfig.parse({"method": "ngram", "disable_by_batch_size": None}).disable_by_batch_size is None
    assert SpeculativeConfig.parse('{"method": "suffix", "disable_by_batch_size": 32}').disable_by_batch_size == 32


def test_no_proposals_at_or_above_disable_by_batch_size(ngram_llm):
    import dataclasses

    scheduler = ngram_llm.engine.core.scheduler
    config = scheduler.config
    scheduler.config = dataclasses.replace(config, speculative_disable_batch_size=2)
    try:
        core = ngram_llm.engine.core
        drafts = core.num_draft_tokens
        prompt = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"
        ngram_llm.generate([prompt] * 3, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        assert core.num_draft_tokens == drafts  # three running: none proposed
        ngram_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        assert core.num_draft_tokens > drafts  # alone: proposed
    finally:
        scheduler.config = config


def test_poor_acceptance_pauses_a_requests_proposals(tiny_models):
    """A proposer that is always wrong: with disable_by_acceptance_rate 0.1 the request soon
    pauses and only probes now and then; without it (the default) every step verifies a draft.
    The tokens are plain decoding's either way."""
    path = tiny_models("LlamaForCausalLM")
    prompt = {"prompt_token_ids": [5, 6, 7, 8] * 6}
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    runs = {}
    for name, extra in [("gated", {"disable_by_acceptance_rate": 0.1}), ("always", {})]:
        llm = LLM(path, dtype="float32", kv_cache_memory=16 << 20,
                  speculative_config={"method": "ngram", "num_speculative_tokens": 4, **extra})
        llm.engine.core.scheduler.proposer = WrongProposer()
        runs[name] = (llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids,
                      llm.engine.core.num_draft_tokens)
        llm.engine.shutdown()
    plain = LLM(path, dtype="float32", kv_cache_memory=16 << 20).generate(prompt, params, use_tqdm=False)
    assert runs["gated"][0] == runs["always"][0] == plain[0].outputs[0].token_ids
    assert runs["always"][1] >= 4 * 60  # a 4-token draft nearly every step
    assert runs["gated"][1] <= 4 * 16  # paused after four rejected drafts, then probes at 4, 8, 16, 32 steps


class WrongProposer:
    """Proposes the last vocabulary id, which the tiny random model never picks greedily here."""

    def propose(self, request, k):
        return [49151] * k

    def finished(self, request):
        pass


def test_unsupported_speculative_methods_are_refused():
    for bad, message in [({"method": "eagle", "model": "x"}, "not supported yet"),
                         ({"method": "draft_model"}, "model .the draft model's path. is required"),
                         ({"method": "draft_model", "model": "x", "quantization": "fp8"}, "quantization must be"),
                         ({"method": "ngram", "model": "x"}, "are for method 'draft_model'"),
                         ({"method": "ngram", "num_speculative_tokens": 0}, "integer >= 1"),
                         ("{not json", "not valid JSON"),
                         ({"method": "ngram", "disable_by_batch_size": 0}, "disable_by_batch_size"),
                         ({"method": "ngram", "disable_by_acceptance_rate": 2}, "disable_by_acceptance_rate")]:
        with pytest.raises(ValueError, match=message):
            EngineArgs(speculative_config=bad).create_engine_config()


def test_acceptance_counters_per_request_and_in_prometheus(ngram_llm):
    import anyio
    import httpx

    from asyncllm import AsyncEngine
    from asyncllm.server import build_app
    from server_helpers import RunningServer

    tok = ngram_llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Repeat this text exactly:\n{PASSAGE}"}],
                                     tokenize=False, add_generation_prompt=True)
    core = ngram_llm.engine.core
    drafts, accepted = core.num_draft_tokens, core.num_accepted_tokens
    metrics = ngram_llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0].metrics
    assert metrics.spec_num_draft_tokens == core.num_draft_tokens - drafts > 0
    assert 0 < metrics.spec_num_accepted_tokens == core.num_accepted_tokens - accepted

    engine = AsyncEngine.from_args(dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                                        "prompt_lookup_max": 3})
    server = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        anyio.run(lambda: engine.complete(prompt, max_tokens=24, temperature=0))
        text = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
        engine.shutdown()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("asyncllm_spec_decode")}
    assert values["asyncllm_spec_decode_num_draft_tokens_total"] >= values["asyncllm_spec_decode_num_accepted_tokens_total"] > 0
    assert values["asyncllm_spec_decode_num_drafts_total"] > 0
    assert values["asyncllm_spec_decode_mean_acceptance_length"] > 1.5


def test_ngram_with_n_samples_stop_strings_chunked_prompts_and_cache_hits(default_llm):
    """The cases plain decoding has, with proposals: two seeded samples per request, a stop string
    that ends the text inside an accepted run, prompts computed in 32-token chunks, and the second
    run of each served by the prefix cache; always plain decoding's tokens and texts."""
    llm = LLM(dtype="float32", max_num_batched_tokens=32,
              speculative_config={"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1,
                                  "disable_by_batch_size": None})
    try:
        tok = llm.get_tokenizer()
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Repeat this text exactly:\n{PASSAGE}"}],
                                         tokenize=False, add_generation_prompt=True)
        greedy = default_llm.generate(prompt, SamplingParams(max_tokens=60, temperature=0), use_tqdm=False)[0]
        text = greedy.outputs[0].text
        stop = text[len(text) // 2:len(text) // 2 + 12]  # somewhere in a copied stretch
        cases = [SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=40),
                 SamplingParams(temperature=0, max_tokens=60, stop=[stop])]
        core = llm.engine.core
        for params in cases:
            want = default_llm.generate(prompt, params, use_tqdm=False)[0]
            for attempt in range(2):
                accepted = core.num_accepted_tokens
                got = llm.generate(prompt, params, use_tqdm=False)[0]
                assert [(c.token_ids, c.text, c.finish_reason) for c in got.outputs] == \
                    [(c.token_ids, c.text, c.finish_reason) for c in want.outputs]
                assert core.num_accepted_tokens > accepted
                assert attempt == 0 or got.num_cached_tokens > 0
        assert want.outputs[0].finish_reason == "stop" and stop not in want.outputs[0].text
    finally:
        llm.engine.shutdown()
