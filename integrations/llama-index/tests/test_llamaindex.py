"""The LlamaIndex LLM: sync, async and streaming, in-process and remote; cancel aborts."""
import time

import anyio
import pytest
from llama_index.core.llms import ChatMessage

from asyncllm import AsyncEngine
from asyncllm.server import build_app
from llama_index.llms.asyncllm import AsyncLLM
from server_helpers import RunningServer

CHAT = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Name a planet.")]


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine.from_args(dtype="float32")
    yield engine
    engine.shutdown()


def test_metadata(engine):
    meta = AsyncLLM(engine=engine, max_tokens=32).metadata
    assert meta.context_window == engine.max_model_len and meta.num_output == 32
    assert meta.is_chat_model and meta.model_name == "SmolLM2-135M-Instruct"


def test_sync_async_and_streaming_agree(engine):
    llm = AsyncLLM(engine=engine, max_tokens=16, temperature=0)
    text = llm.complete("The capital of Italy is").text
    streamed = list(llm.stream_complete("The capital of Italy is"))
    assert streamed[-1].text == text and "".join(r.delta for r in streamed) == text
    answer = llm.chat(CHAT).message.content
    chat_stream = list(llm.stream_chat(CHAT))
    assert chat_stream[-1].message.content == answer and len(chat_stream) > 2

    async def native():
        a = (await llm.acomplete("The capital of Italy is")).text
        b = [r async for r in await llm.astream_complete("The capital of Italy is")][-1].text
        c = (await llm.achat(CHAT)).message.content
        d = [r async for r in await llm.astream_chat(CHAT)][-1].message.content
        return a, b, c, d

    assert anyio.run(native) == (text, text, answer, answer)
    assert llm.chat(CHAT).raw["usage"]["completion_tokens"] > 0


def test_remote_mode_and_cancel(engine):
    srv = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        remote = AsyncLLM(base_url=srv.url, max_tokens=16, temperature=0)
        local = AsyncLLM(engine=engine, max_tokens=16, temperature=0)
        assert remote.chat(CHAT).message.content == local.chat(CHAT).message.content
        assert [r.delta for r in remote.stream_complete("Rivers")] == [r.delta for r in local.stream_complete(
            "Rivers")]
    finally:
        srv.stop()
    long = AsyncLLM(engine=engine, max_tokens=400, additional_kwargs={"ignore_eos": True})

    async def cancel():
        gen = await long.astream_chat(CHAT)
        async for i, _ in _enumerate(gen):
            if i == 2:
                break
        await gen.aclose()

    anyio.run(cancel)
    deadline = time.monotonic() + 10
    while engine.engine.has_unfinished_requests() or engine._thread._inbox:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert engine.engine.core.kv.num_used_blocks() == 0


async def _enumerate(agen):
    i = 0
    async for item in agen:
        yield i, item
        i += 1
