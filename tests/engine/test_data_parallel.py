"""Data parallelism: two engine replicas (each with its own worker process, scheduler and KV cache)
behind one AsyncEngine and one server; requests routed by load and prefix-cache affinity; a dead
replica leaves the rotation while the other serves; the stats and /metrics are summed."""
import asyncio
import os
import signal
import time

import pytest

import helpers
from asyncllm import LLM, AsyncEngine, EngineDeadError, SamplingParams
from asyncllm.engine.data_parallel import PrefixAffinityRouter
from server_helpers import pid_alive

pytestmark = pytest.mark.timeout(300)

ARGS = dict(dtype="float32", kv_cache_memory=16 << 20, max_num_batched_tokens=64)


def _worker_pids(engine: AsyncEngine) -> list[int]:
    return [p.pid for e in engine.engines for p in e.core.executor.processes]


# ------------------------------------------------------------------ routing


def test_the_router_keeps_a_prefix_on_its_replica_until_it_is_too_busy():
    router = PrefixAffinityRouter(block_size=4, max_imbalance=2)
    system = list(range(100, 112))  # three full blocks
    first = router.choose(system + [1, 2], None, [0, 0])
    assert first == 0  # the least loaded, lowest index on ties
    # The same prefix goes back to replica 0 while it is at most 2 sequences busier.
    assert router.choose(system + [7], None, [2, 0]) == 0
    assert router.affinity_hits == 1
    # Too busy: the least loaded takes it, and the prefix now lives there.
    assert router.choose(system + [8], None, [3, 0]) == 1
    assert router.choose(system + [9], None, [3, 3]) == 1
    # Another salt (tenant, adapter) is another cache: no affinity, least loaded.
    assert router.choose(system + [9], "tenant-a", [0, 1]) == 0
    # Shorter than a block: nothing to share, least loaded.
    assert router.choose([1, 2], None, [5, 4]) == 1
    # A dead replica (None) is never picked, even for its prefix.
    assert router.choose(system + [1], None, [0, None]) == 0
    with pytest.raises(EngineDeadError):
        router.choose(system, None, [None, None])


def test_the_router_forgets_the_oldest_prefixes_beyond_its_capacity():
    router = PrefixAffinityRouter(block_size=2, capacity=4)
    router.choose([1, 2, 3, 4], None, [0, 0])  # two hashes → replica 0
    router.choose([5, 6, 7, 8, 9, 10], None, [1, 0])  # three more → replica 1; the oldest is dropped
    assert len(router._owner) == 4
    assert router.choose([1, 2, 3, 4], None, [0, 0]) == 0  # [1, 2, 3, 4] still known (its second block)
    assert router.affinity_hits == 1


def test_llm_refuses_data_parallel_with_a_message(tiny_models):
    with pytest.raises(ValueError, match="AsyncEngine.from_args"):
        LLM(tiny_models("LlamaForCausalLM"), data_parallel_size=2)
    with pytest.raises(ValueError, match="data_parallel_size > 1 runs each replica's model in worker processes"):
        AsyncEngine.from_args(model=tiny_models("LlamaForCausalLM"), data_parallel_size=2,
                              distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1"):
        AsyncEngine.from_args(model=tiny_models("LlamaForCausalLM"), data_parallel_size=0)


# ------------------------------------------------------------------ two replicas


@pytest.fixture(scope="module")
def two_replicas(tiny_models):
    path = tiny_models("LlamaForCausalLM")
    engine = AsyncEngine.from_args(model=path, data_parallel_size=2, **ARGS)
    yield path, engine
    engine.shutdown()


async def _greedy(engine: AsyncEngine, prompt, max_tokens: int = 10) -> list[int]:
    out = await engine.complete(prompt, max_tokens=max_tokens, temperature=0)
    return list(out.outputs[0].token_ids)


def test_two_replicas_give_one_engines_tokens_and_share_the_work(two_replicas):
    path, engine = two_replicas
    assert len(engine.engines) == 2 and engine.replicas_serving == [True, True]
    pids = _worker_pids(engine)
    assert len(set(pids)) == 2 and all(pid_alive(pid) for pid in pids)
    prompts = [{"prompt_token_ids": list(range(3 + i, 20 + 3 * i))} for i in range(8)]

    async def run():
        return await asyncio.gather(*(_greedy(engine, p) for p in prompts))

    served = asyncio.run(run())
    llm = LLM(path, **ARGS)
    try:
        alone = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, SamplingParams(
            max_tokens=10, temperature=0), use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert served == alone
    steps = [e.core.num_steps for e in engine.engines]
    assert all(s > 0 for s in steps), steps  # 8 concurrent requests were spread over both replicas
    total = engine.stats()
    assert total.num_steps == sum(steps)
    assert total.generation_tokens == sum(e.core.generation_tokens for e in engine.engines) >= 80
    assert total.requests_finished.get("length", 0) >= 8


def test_a_shared_prefix_stays_on_one_replica_and_hits_its_cache(two_replicas):
    _, engine = two_replicas
    system = list(range(200, 264))  # 4 blocks of 16 tokens

    async def run():
        # One after another: each finds the replica idle, so affinity wins.
        return [await _greedy(engine, {"prompt_token_ids": system + [5 + i, 6 + i]}, 2) for i in range(4)]

    hits_before = [e.core.kv.stats.hits for e in engine.engines]
    asyncio.run(run())
    gained = [e.core.kv.stats.hits - before for e, before in zip(engine.engines, hits_before)]
    assert sorted(gained)[0] == 0 and max(gained) >= 3 * len(system)  # all on one replica, 3 cache hits


def test_an_abort_frees_the_blocks_on_its_replica(two_replicas):
    _, engine = two_replicas

    async def run():
        stream = engine.stream("Tell me a long story", max_tokens=200, temperature=0)
        async for _ in stream:
            break
        await stream.aclose()
        deadline = time.monotonic() + 10
        while any(e.core.kv.num_used_blocks() for e in engine.engines) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    asyncio.run(run())
    assert all(e.core.kv.num_used_blocks() == 0 for e in engine.engines)
    assert engine.stats().requests_finished.get("abort", 0) >= 1


def test_a_dead_replica_leaves_the_rotation_and_the_other_serves(tiny_models):
    path = tiny_models("Qwen3ForCausalLM")
    engine = AsyncEngine.from_args(model=path, data_parallel_size=2, **ARGS)
    try:
        async def run():
            first = await _greedy(engine, "Hello there", 6)
            os.kill(engine.engines[1].core.executor.processes[0].pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while engine.replicas_serving[1] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            after = [await _greedy(engine, "Hello there", 6) for _ in range(4)]
            return first, after

        first, after = asyncio.run(run())
        assert engine.replicas_serving == [True, False]
        assert engine.is_healthy and engine.dead_error is None
        assert after == [first] * 4  # every request went to the live replica
        os.kill(engine.engines[0].core.executor.processes[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while engine.is_healthy and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not engine.is_healthy and "every data-parallel replica is dead" in str(engine.dead_error)
        with pytest.raises(EngineDeadError):
            asyncio.run(_greedy(engine, "Hello there", 2))
    finally:
        engine.shutdown()
    assert not any(pid_alive(pid) for pid in _worker_pids(engine))


def test_serve_with_dp_2_answers_as_one_engine_and_sums_the_metrics(tiny_models):
    """`asyncllm serve MODEL -dp 2` behind the real openai client."""
    import httpx
    import openai

    from server_helpers import start_cli_server, stop_process

    path = tiny_models("Qwen3ForCausalLM")
    proc, url = start_cli_server([path, "-dp", "2", "--dtype", "float32", "--no-kv-cache-prefault",
                                  "--kv-cache-memory", str(16 << 20)])
    try:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none")

        async def run():
            model = (await client.models.list()).data[0].id
            outs = await asyncio.gather(*(client.completions.create(model=model, prompt=p, max_tokens=12,
                                                                    temperature=0)
                                          for p in helpers.TEXT_PROMPTS[:4]))
            await client.close()
            return [o.choices[0].text for o in outs]

        served = asyncio.run(run())
        metrics = httpx.get(url + "/metrics").text
    finally:
        stop_process(proc)
    assert served == helpers.local_greedy_texts(path, helpers.TEXT_PROMPTS[:4]) and all(served)
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith("asyncllm_") and "{" in line}
    assert values["asyncllm_engine_replicas_serving"] == 2
    assert values["asyncllm_generation_tokens_total"] >= 4 * 12 - 4  # summed over both replicas (EOS aside)
