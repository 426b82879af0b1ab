"""ChatAsyncLLM / AsyncLLMCompletion beyond the standard suites: remote mode, cancellation, LLM class."""
import time

import anyio
import pytest
from pydantic import BaseModel, Field

from asyncllm import AsyncEngine
from asyncllm.server import build_app
from langchain_asyncllm import AsyncLLMCompletion, ChatAsyncLLM
from server_helpers import RunningServer


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine.from_args(dtype="float32")
    yield engine
    engine.shutdown()


def _wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() or engine._thread._inbox:
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.02)


def test_remote_streaming_equals_in_process(engine):
    srv = RunningServer(build_app(engine, api_key="k", run_lifespan=False), lifespan="off")
    try:
        local = ChatAsyncLLM(engine=engine, max_tokens=20, temperature=0)
        remote = ChatAsyncLLM(base_url=srv.url, api_key="k", max_tokens=20, temperature=0)
        local_chunks = [c.content for c in local.stream("Say something about rivers")]
        remote_chunks = [c.content for c in remote.stream("Say something about rivers")]
        assert "".join(remote_chunks) == "".join(local_chunks) and len(remote_chunks) > 2
        final = remote.invoke("Say something about rivers")
        assert final.content == "".join(local_chunks)
        assert final.usage_metadata["output_tokens"] > 0
        completion = AsyncLLMCompletion(base_url=srv.url, api_key="k", max_tokens=8, temperature=0)
        assert completion.invoke("The sky is") == AsyncLLMCompletion(engine=engine, max_tokens=8,
                                                                     temperature=0).invoke("The sky is")
    finally:
        srv.stop()


def test_cancelled_astream_aborts_in_the_engine(engine):
    model = ChatAsyncLLM(engine=engine, max_tokens=400, temperature=0, model_kwargs={"ignore_eos": True})

    async def consume():
        n = 0
        async for _ in model.astream("Write a very long story"):
            n += 1
            if n == 3:
                break

    async def cancel_task():
        with anyio.move_on_after(0.5):
            async for _ in model.astream("Write another very long story"):
                pass

    anyio.run(consume)
    anyio.run(cancel_task)
    _wait_idle(engine)
    assert engine.engine.core.kv.num_used_blocks() == 0
    assert engine.stats().requests_finished.get("abort", 0) >= 2
    # The sync stream too: leaving it early aborts.
    for i, _ in enumerate(model.stream("One more long story")):
        if i == 2:
            break
    _wait_idle(engine)
    assert engine.engine.core.kv.num_used_blocks() == 0


class Pet(BaseModel):
    name: str = Field(max_length=20)
    legs: int = Field(ge=0, le=8)


def test_completion_llm_and_structured_output(engine):
    llm = AsyncLLMCompletion(engine=engine, max_tokens=10, temperature=0)
    text = llm.invoke("1, 2, 3,")
    assert text and "".join(llm.stream("1, 2, 3,")) == text
    assert anyio.run(llm.ainvoke, "1, 2, 3,") == text
    assert llm.invoke("1, 2, 3,", stop=[","]) == text.split(",")[0]
    pet = ChatAsyncLLM(engine=engine, max_tokens=60, temperature=0).with_structured_output(Pet).invoke("A dog")
    assert isinstance(pet, Pet)
    raw = ChatAsyncLLM(engine=engine, max_tokens=60, temperature=0).with_structured_output(
        Pet, include_raw=True).invoke("A cat")
    assert isinstance(raw["parsed"], Pet) and raw["raw"].content
