"""The mp executor: the model in a worker process gives the same tokens; its death is an
EngineDeadError for every waiter within a second, /health 503, and no process is left."""
import os
import signal
import time

import anyio
import pytest

from asyncllm import LLM, AsyncEngine, EngineDeadError, SamplingParams
from asyncllm.executor.multiproc import MultiprocExecutor
from asyncllm.sampling.structured import StructuredOutputs
from server_helpers import pid_alive

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]


_pid_alive = pid_alive


@pytest.fixture(scope="module")
def mp_llm():
    llm = LLM(dtype="float32", max_num_seqs=64, distributed_executor_backend="mp")
    yield llm
    llm.engine.shutdown()


def test_mp_gives_the_same_tokens_and_logprobs_as_uni(default_llm, mp_llm):
    assert isinstance(mp_llm.engine.core.executor, MultiprocExecutor)
    params = [SamplingParams(max_tokens=24, temperature=0, logprobs=3, prompt_logprobs=2),
              SamplingParams(max_tokens=24, temperature=0.8, seed=3),
              SamplingParams(max_tokens=24, temperature=0, structured_outputs=StructuredOutputs(choice=["yes", "no"]))]
    for p in params:
        uni = default_llm.generate(PROMPTS, p, use_tqdm=False)
        mp = mp_llm.generate(PROMPTS, p, use_tqdm=False)
        for a, b in zip(uni, mp):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text
            if p.logprobs:
                assert a.outputs[0].logprobs == b.outputs[0].logprobs
                assert a.prompt_logprobs == b.prompt_logprobs
    assert mp_llm.engine.core.kv.num_used_blocks() == 0


def test_mp_survives_preemption_with_the_same_tokens(default_llm):
    """A preempted request leaves the worker's batch but keeps its tokens and generator there."""
    small = LLM(dtype="float32", kv_cache_memory=14 * (2 * 30 * 16 * 3 * 64 * 4), max_num_seqs=8,
                distributed_executor_backend="mp")
    try:
        params = SamplingParams(max_tokens=40, temperature=0.7, seed=11, ignore_eos=True)
        prompts = [f"Write a story number {i} about the sea." for i in range(6)]
        got = small.generate(prompts, params, use_tqdm=False)
        assert small.engine.core.scheduler.num_preemptions > 0
        want = default_llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    finally:
        small.engine.shutdown()
    assert not _pid_alive(small.engine.core.executor.pid)


@pytest.mark.anyio
async def test_killing_the_worker_mid_stream_fails_every_waiter_within_a_second(anyio_backend):
    engine = AsyncEngine.from_args(dtype="float32", distributed_executor_backend="mp")
    pid = engine.engine.core.executor.pid
    started = anyio.Event()
    errors: dict[str, tuple[BaseException, float]] = {}
    killed_at = []

    async def stream(rid):
        try:
            async for _ in engine.stream("Tell me a long story about the sea", SamplingParams(
                    max_tokens=400, ignore_eos=True, temperature=0), request_id=rid):
                started.set()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors[rid] = (exc, time.monotonic())

    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for rid in ("a", "b", "c"):
                    tg.start_soon(stream, rid)
                await started.wait()
                killed_at.append(time.monotonic())
                os.kill(pid, signal.SIGKILL)
        assert set(errors) == {"a", "b", "c"}
        for exc, when in errors.values():
            assert isinstance(exc, EngineDeadError), exc
            assert "killed by signal 9" in str(exc)
            assert when - killed_at[0] < 1.0
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            await engine.complete("Hello", max_tokens=2)
    finally:
        engine.shutdown()
    assert not _pid_alive(pid)


@pytest.mark.anyio
async def test_a_worker_dying_while_idle_is_noticed_within_a_second(anyio_backend):
    from httpx import ASGITransport, AsyncClient

    from asyncllm.server.app import build_app

    engine = AsyncEngine.from_args(dtype="float32", distributed_executor_backend="mp")
    try:
        async with AsyncClient(transport=ASGITransport(build_app(engine)), base_url="http://t") as client:
            assert (await client.get("/health")).status_code == 200
            out = await engine.complete("Hello", max_tokens=2, temperature=0)
            assert out.outputs[0].token_ids
            os.kill(engine.engine.core.executor.pid, signal.SIGKILL)
            with anyio.fail_after(1.0):
                while engine.dead_error is None:
                    await anyio.sleep(0.02)
            assert not engine.is_healthy
            assert (await client.get("/health")).status_code == 503
    finally:
        engine.shutdown()


def test_the_worker_exits_when_the_engine_process_is_killed(tmp_path):
    """No orphan: SIGKILL the engine's process and its worker goes too."""
    import subprocess
    import sys

    script = tmp_path / "engine.py"
    script.write_text("from asyncllm import LLM\n"
                      "llm = LLM(dtype='float32', distributed_executor_backend='mp')\n"
                      "print(llm.engine.core.executor.pid, flush=True)\n"
                      "import time; time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
        assert _pid_alive(worker_pid)
    finally:
        parent.kill()  # by its own pid
        parent.wait()
    deadline = time.monotonic() + 5
    while _pid_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(worker_pid)


def test_serve_with_the_mp_backend_gives_the_same_greedy_tokens(default_llm):

    import openai

    from server_helpers import start_cli_server, stop_process

    proc, url = start_cli_server(["--dtype", "float32", "--distributed-executor-backend", "mp",
                                  "--no-kv-cache-prefault"])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        for prompt in PROMPTS:
            got = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
            want = default_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
            assert got.choices[0].text == want[0].outputs[0].text
    finally:
        stop_process(proc)


def test_unknown_executor_backend_is_refused():
    with pytest.raises(ValueError, match="distributed_executor_backend must be uni, mp or ray, got 'dask'"):
        LLM(distributed_executor_backend="dask")
