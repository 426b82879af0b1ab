"""Pipeline parallelism over 2 (and 3) CPU processes: each stage holds its layers and their KV cache
only, the hidden states and residual cross point to point, the last stage samples and hands the
tokens back to every stage: greedy ids equal to transformers, logprobs close, as with one stage."""
import time

import pytest

import helpers
from asyncllm import LLM, SamplingParams

pytestmark = pytest.mark.timeout(300)

ARGS = dict(dtype="float32", kv_cache_memory=16 << 20)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM", "Qwen2MoeForCausalLM"])
def test_two_stages_match_transformers(arch, tiny_models):
    # Chunked prompts sharing steps with decodes and a prefix-cache hit, through both stages.
    helpers.check_split_matches_transformers(tiny_models(arch), 2, kv_cache_memory=16 << 20, pipeline_parallel_size=2)


def test_three_uneven_stages_hold_only_their_layers(tmp_path, tokenizer_dir):
    """5 layers over 3 stages (1, 2, 2): each stage's KV cache has its layers only, so with the same
    memory per process the engine takes the fewest blocks any stage holds; tokens as transformers."""
    helpers.save_llama_variant(tmp_path, tokenizer_dir, seed=5, num_hidden_layers=5)
    args = {**ARGS, "kv_cache_memory": 4 << 20}
    one = LLM(str(tmp_path), **args)
    blocks_one_stage = one.engine.core.load_report.num_blocks
    one.engine.shutdown()
    llm = LLM(str(tmp_path), pipeline_parallel_size=3, max_num_batched_tokens=20, **args)
    try:
        # The stages of 2 layers hold 5/2 as many blocks as the whole model in the same memory.
        assert 2.45 < llm.engine.core.load_report.num_blocks / blocks_one_stage < 2.55
        helpers.check_mixed_steps_match_transformers(llm, helpers.load_hf(str(tmp_path)), max_tokens=12)
    finally:
        llm.engine.shutdown()


def test_two_stages_of_two_tensor_parallel_ranks_match_transformers(tiny_models):
    """TP=2 x PP=2: four processes (two per stage, each stage its own tensor-parallel group with its
    shared-memory collectives), slow on two cores but the same tokens."""
    helpers.check_split_matches_transformers(tiny_models("Qwen3ForCausalLM"), 4, max_tokens=12,
                                             kv_cache_memory=16 << 20, pipeline_parallel_size=2, tensor_parallel_size=2)


@pytest.mark.parametrize("split", [dict(pipeline_parallel_size=2), dict(tensor_parallel_size=3)])
def test_the_default_model_split_gives_one_process_tokens(split, default_llm):
    """The real default model over two stages, and over three tensor-parallel ranks (its 9 heads
    and 3 KV heads do not split in two)."""
    prompts = helpers.TEXT_PROMPTS[:4]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=1)
    want = default_llm.generate(prompts, params, use_tqdm=False)
    llm = LLM(dtype="float32", kv_cache_memory=64 << 20, **split)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for token, x, y in zip(b.outputs[0].token_ids, a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(x[token].logprob - y[token].logprob) < 1e-3


def test_speculative_decoding_over_stages_gives_plain_decodings_tokens(tiny_models):
    """Accepted runs of proposed tokens reach the first stage too (its next inputs)."""
    path = tiny_models("Qwen3ForCausalLM")
    prompts = [{"prompt_token_ids": [5, 6, 7, 8] * 6}, {"prompt_token_ids": list(range(40, 70))}]
    params = SamplingParams(max_tokens=24, temperature=0)
    plain = LLM(path, **ARGS)
    try:
        want = [list(o.outputs[0].token_ids) for o in plain.generate(prompts, params, use_tqdm=False)]
    finally:
        plain.engine.shutdown()
    llm = LLM(path, pipeline_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 3},
              **ARGS)
    try:
        got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.core.num_draft_tokens > 0
    finally:
        llm.engine.shutdown()
    assert got == want


def test_what_pipeline_parallel_does_not_run_is_refused(tiny_models):
    with pytest.raises(ValueError, match="2 layers cannot split over 3 pipeline stages"):
        LLM(tiny_models("LlamaForCausalLM"), pipeline_parallel_size=3, **ARGS)
    with pytest.raises(ValueError, match="enable_lora is not supported with pipeline_parallel_size > 1"):
        LLM(tiny_models("LlamaForCausalLM"), pipeline_parallel_size=2, enable_lora=True)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1"):
        LLM(tiny_models("LlamaForCausalLM"), pipeline_parallel_size=0)


def test_a_dead_stage_stops_the_other_and_the_engine(tiny_models):
    helpers.check_a_killed_process_stops_the_others(tiny_models("LlamaForCausalLM"), 0, pipeline_parallel_size=2)


def test_serve_with_pp_2_gives_the_one_stage_answers(tiny_models):
    """`asyncllm serve MODEL -pp 2` behind the real openai client."""
    helpers.check_serve_gives_one_process_texts(tiny_models("Qwen3ForCausalLM"), ["-pp", "2"])


def test_two_batches_are_in_flight_at_once_and_never_share_a_request(tiny_models):
    """The stages overlap: while one batch is in the second stage the next runs in the first; the
    scheduler splits the running requests between the batches and keeps in-flight ones out."""
    path = tiny_models("LlamaForCausalLM")
    prompts = [{"prompt_token_ids": list(range(30 + 3 * i, 50 + 3 * i))} for i in range(8)]
    params = SamplingParams(max_tokens=16, temperature=0)
    llm = LLM(path, pipeline_parallel_size=2, **ARGS)
    core = llm.engine.core
    submitted = []
    start = core.executor.execute_async

    def execute_async(sched):
        in_flight = {s.req_id for pending, _, _ in core._in_flight for s in pending.scheduled}
        submitted.append((len(core._in_flight), in_flight & {s.req_id for s in sched.scheduled}))
        return start(sched)

    core.executor.execute_async = execute_async
    try:
        got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert all(not shared for _, shared in submitted)
    assert sum(depth == 1 for depth, _ in submitted) > len(submitted) // 2  # mostly overlapped
    hf = helpers.load_hf(path)
    assert got == [helpers.hf_greedy(hf, p["prompt_token_ids"], 16)[0] for p in prompts]


def test_aborts_while_batches_are_in_flight_free_everything(tiny_models):
    import asyncio

    from asyncllm import AsyncEngine

    engine = AsyncEngine.from_args(model=tiny_models("Qwen3ForCausalLM"), pipeline_parallel_size=2, **ARGS)

    async def run():
        async def one(i):
            out = []
            async for text in engine.stream({"prompt_token_ids": list(range(10 + i, 30 + i))}, max_tokens=40,
                                            temperature=0, ignore_eos=True):
                out.append(text)
                if i % 2 and len(out) == 3:
                    break  # aborts this request, often while its batch is in flight
            return len(out)

        return await asyncio.gather(*(one(i) for i in range(8)))

    try:
        lengths = asyncio.run(run())
        deadline = time.monotonic() + 10
        core = engine.engine.core
        while (core.kv.num_used_blocks() or core.has_unfinished_requests()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert core.kv.num_used_blocks() == 0 and not core.scheduler.in_flight
        assert [n for i, n in enumerate(lengths) if i % 2] == [3] * 4
        assert all(n > 3 for i, n in enumerate(lengths) if not i % 2)
    finally:
        engine.shutdown()
