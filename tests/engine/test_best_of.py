"""best_of: n <= best_of samples, the n with the highest cumulative logprob returned (each
sampled token's logprob is computed for the ranking even when logprobs were not asked for)."""
import openai
import pytest

from asyncllm import InvalidRequestError, SamplingParams
from asyncllm.server import build_app
from server_helpers import RunningServer


def test_the_n_best_of_the_samples_by_cumulative_logprob(default_llm):
    prompt = "Write a word:"
    # The same seed gives the same samples: best_of=5 must pick the top 2 of these 5.
    all_five = default_llm.generate(prompt, SamplingParams(n=5, temperature=1.0, seed=7, max_tokens=8, logprobs=0),
                                    use_tqdm=False)[0].outputs
    ranked = sorted(all_five, key=lambda c: -c.cumulative_logprob)[:2]
    best = default_llm.generate(prompt, SamplingParams(n=2, best_of=5, temperature=1.0, seed=7, max_tokens=8),
                                use_tqdm=False)[0].outputs
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert [c.index for c in best] == [0, 1]
    assert best[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob, abs=1e-5)
    assert best[0].logprobs is None  # not asked for: only ranked by
    assert not default_llm.engine.has_unfinished_requests() and default_llm.engine.core.kv.num_used_blocks() == 0


def test_best_of_is_validated():
    with pytest.raises(InvalidRequestError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(InvalidRequestError, match="greedy"):
        SamplingParams(n=1, best_of=2, temperature=0)


def test_server_best_of(default_llm):
    from asyncllm import AsyncEngine

    engine = AsyncEngine.from_args(dtype="float32")
    server = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        r = client.completions.create(model=engine.model_name, prompt="Write a word:", max_tokens=8, n=2, seed=7,
                                      temperature=1.0, extra_body={"best_of": 5})
    finally:
        server.stop()
        engine.shutdown()
    expected = default_llm.generate("Write a word:", SamplingParams(n=2, best_of=5, temperature=1.0, seed=7,
                                                                    max_tokens=8), use_tqdm=False)[0].outputs
    assert [c.text for c in r.choices] == [c.text for c in expected]
