"""AsyncEngine: concurrency, cancellation, failure isolation, several loops, trio, shutdown."""
import asyncio
import random
import threading
import time

import anyio
import pytest

from asyncllm import AsyncEngine, SamplingParams
from asyncllm.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def _engine(**kw) -> AsyncEngine:
    return AsyncEngine.from_args(dtype="float32", **kw)


async def _wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Until the engine thread has nothing left to do (aborts applied, blocks freed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.engine.has_unfinished_requests() and not engine._thread._inbox:
            return
        await anyio.sleep(0.02)
    raise AssertionError("engine did not become idle")


@pytest.fixture(scope="module")
def shared_engine():
    engine = _engine()
    yield engine
    engine.shutdown()


PROMPTS = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(100)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # once; trio streams in its own test below
async def test_100_concurrent_streams_equal_sequential(shared_engine, anyio_backend):
    params = dict(max_tokens=8, temperature=0, ignore_eos=True)

    async def collect(prompt):
        return "".join([t async for t in shared_engine.stream(prompt, **params)])

    concurrent = await asyncio.gather(*[collect(p) for p in PROMPTS])
    sequential = [(await shared_engine.complete(p, **params)).outputs[0].text for p in PROMPTS]
    assert concurrent == sequential
    assert all(concurrent)


@pytest.mark.anyio
async def test_abort_storm_frees_every_block(shared_engine):
    rng = random.Random(0)
    completed, cancelled = 0, 0

    async def consume(i, cancel_after):
        nonlocal completed, cancelled
        n = 0
        async for _ in shared_engine.stream(PROMPTS[i % 100], max_tokens=16, temperature=0, ignore_eos=True):
            n += 1
            if cancel_after is not None and n >= cancel_after:
                cancelled += 1
                return  # leaving the async for early aborts the request
        completed += 1

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(consume, i, rng.randint(0, 8) if i % 2 else None)
        # And some tasks cancelled from outside mid-stream.
        with anyio.move_on_after(0.5):
            async with anyio.create_task_group() as inner:
                for i in range(20):
                    inner.start_soon(consume, i, None)
    await _wait_idle(shared_engine)
    assert completed >= 100 and cancelled >= 90
    assert shared_engine.engine.core.kv.num_used_blocks() == 0
    assert shared_engine.engine.core.scheduler.num_running == 0


@pytest.mark.anyio
async def test_injected_fault_fails_only_that_request(anyio_backend):
    engine = _engine()

    class Poison:
        def apply(self, logits, batch):
            if "poisoned" in batch.req_ids:
                raise RuntimeError("injected fault")

    engine.engine.core.executor.worker.runner.sampler.processors.append(Poison())
    results = {}

    async def run(rid):
        try:
            out = await engine.complete("Tell me about the sea", request_id=rid, max_tokens=12, temperature=0)
            results[rid] = out.outputs[0].text
        except RequestFailedError as exc:
            results[rid] = exc

    try:
        async with anyio.create_task_group() as tg:
            for rid in ["a", "poisoned", "b", "c"]:
                tg.start_soon(run, rid)
        assert isinstance(results["poisoned"], RequestFailedError)
        assert "injected fault" in str(results["poisoned"])
        assert results["a"] == results["b"] == results["c"] and isinstance(results["a"], str) and results["a"]
        assert engine.is_healthy
        again = await engine.complete("Tell me about the sea", max_tokens=12, temperature=0)
        assert again.outputs[0].text == results["a"]
        await _wait_idle(engine)
        assert engine.engine.core.kv.num_used_blocks() == 0
    finally:
        engine.shutdown()


@pytest.mark.anyio
async def test_engine_thread_crash_raises_engine_dead_in_every_waiter(anyio_backend):
    engine = _engine()
    scheduler = engine.engine.core.scheduler
    real = scheduler.schedule
    calls = {"n": 0}

    def crashing_schedule():
        calls["n"] += 1
        if calls["n"] == 6:
            raise MemoryError("injected crash")
        return real()

    scheduler.schedule = crashing_schedule
    errors = []
    times = []

    async def waiter(i):
        try:
            async for _ in engine.stream(PROMPTS[i], max_tokens=200, temperature=0, ignore_eos=True):
                pass
        except EngineDeadError as exc:
            errors.append(exc)
            times.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(waiter, i)
    crash_seen = time.monotonic()
    assert len(errors) == 10
    assert max(times) - min(times) < 1.0
    assert not engine.is_healthy and isinstance(engine.dead_error, EngineDeadError)
    with pytest.raises(EngineDeadError):
        await engine.complete("Anyone there?", max_tokens=2)
    assert time.monotonic() - crash_seen < 1.0
    engine.shutdown()


def test_two_event_loops_in_two_threads_share_one_engine(shared_engine):
    results = {}

    def run(name, prompts):
        async def main():
            outs = await asyncio.gather(*[shared_engine.complete(p, max_tokens=8, temperature=0) for p in prompts])
            results[name] = [o.outputs[0].text for o in outs]

        asyncio.run(main())

    threads = [threading.Thread(target=run, args=(f"t{i}", PROMPTS[i * 5:(i + 1) * 5])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    expected = asyncio.run(_complete_all(shared_engine, PROMPTS[:10]))
    assert results["t0"] + results["t1"] == expected


def test_a_closed_event_loop_frees_its_requests(shared_engine):
    """A loop closed with a request still running (no aclose: its generator is never finalised):
    the engine thread cannot deliver to it, so it aborts the request, frees its blocks and forgets
    its stream."""
    loop = asyncio.new_event_loop()
    gen = shared_engine.generate("Write a long story", SamplingParams(max_tokens=500, ignore_eos=True))
    first = loop.run_until_complete(gen.__anext__())
    request_id = first.request_id
    loop.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (shared_engine.engine.has_unfinished_requests()
                                           or request_id in shared_engine._thread._streams):
        time.sleep(0.02)
    assert not shared_engine.engine.has_unfinished_requests()
    assert request_id not in shared_engine._thread._streams
    assert shared_engine.engine.core.kv.num_used_blocks() == 0


async def _complete_all(engine, prompts):
    return [(await engine.complete(p, max_tokens=8, temperature=0)).outputs[0].text for p in prompts]


@pytest.mark.anyio
async def test_streaming_under_both_backends(shared_engine, anyio_backend):
    texts = []
    async with anyio.create_task_group() as tg:
        async def one(prompt):
            texts.append("".join([t async for t in shared_engine.stream(prompt, max_tokens=10, temperature=0)]))

        for p in PROMPTS[:4]:
            tg.start_soon(one, p)
    expected = [(await shared_engine.complete(p, max_tokens=10, temperature=0)).outputs[0].text for p in PROMPTS[:4]]
    assert sorted(texts) == sorted(expected)


@pytest.mark.anyio
async def test_cancelled_task_and_aclose_abort(shared_engine, anyio_backend):
    gen = shared_engine.generate("Write a long story", SamplingParams(max_tokens=500, ignore_eos=True))
    await gen.__anext__()
    await gen.aclose()
    with anyio.move_on_after(0.3):
        async for _ in shared_engine.stream("Write another long story", max_tokens=500, ignore_eos=True):
            pass
    await _wait_idle(shared_engine)
    assert shared_engine.engine.core.kv.num_used_blocks() == 0


@pytest.mark.anyio
async def test_validation_raises_before_queueing(shared_engine):
    for bad in [dict(max_tokens=0), dict(temperature=-1), dict(n=1000), dict(logprobs=50), dict(bogus=1)]:
        with pytest.raises(InvalidRequestError):
            await shared_engine.complete("hi", **bad)
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        await shared_engine.complete("word " * 9000, max_tokens=4)
    with pytest.raises(InvalidRequestError):
        await shared_engine.complete("", max_tokens=4)
    assert not shared_engine._thread._inbox


@pytest.mark.anyio
async def test_overload_is_refused_immediately():
    engine = _engine(max_waiting_requests=2, max_num_seqs=1)
    try:
        # Three long requests: the first runs (max_num_seqs=1; it has streamed a token), two wait.
        gens = [engine.generate(f"p{i}", SamplingParams(max_tokens=50, ignore_eos=True)) for i in range(3)]
        await gens[0].__anext__()

        async def start(g):
            await g.__anext__()

        async with anyio.create_task_group() as tg:
            for g in gens[1:]:
                tg.start_soon(start, g)
            await anyio.sleep(0.05)  # both submitted (submission does not wait for the engine)
            started = time.monotonic()
            with pytest.raises(EngineOverloadedError, match="max_waiting_requests"):
                for i in range(5):
                    await engine.complete(f"extra {i}", max_tokens=2)
            assert time.monotonic() - started < 0.5
            tg.cancel_scope.cancel()
        for g in gens:
            await g.aclose()
    finally:
        engine.shutdown()


@pytest.mark.anyio
async def test_shutdown_during_streaming_ends_every_iterator(anyio_backend):
    engine = _engine()
    ends = []

    async def consume(i):
        outs = []
        async for out in engine.generate(PROMPTS[i], SamplingParams(max_tokens=400, ignore_eos=True)):
            outs.append(out)
        ends.append(outs[-1].outputs[0].finish_reason)

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(consume, i)
        await anyio.sleep(0.5)
        await engine.ashutdown(timeout=0.2)
    assert ends == ["abort"] * 6
    engine.shutdown()  # second call is a no-op
    with pytest.raises(Exception):
        await engine.complete("after shutdown", max_tokens=2)


def test_idle_engine_thread_uses_no_cpu(shared_engine):
    asyncio.run(shared_engine.complete("warm up", max_tokens=2))
    time.sleep(0.2)
    cpu_before, wall_before = time.process_time(), time.monotonic()
    time.sleep(1.0)
    cpu = time.process_time() - cpu_before
    assert cpu / (time.monotonic() - wall_before) < 0.05  # < 5% of one core while idle
