"""The LlamaIndex LLM: sync, async and streaming, in-process and remote; cancel aborts."""
import time

import anyio
import pytest
from llama_index.core.llms import ChatMessage
from pydantic import BaseModel, Field

from asyncllm import AsyncEngine, LoRARequest
from asyncllm.lora.adapter import write_random_adapter
from asyncllm.server import build_app
from llama_index.llms.asyncllm import AsyncLLM
from server_helpers import RunningServer

CHAT = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Name a planet.")]


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine.from_args(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
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


def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return f"It is sunny in {location}."


def test_function_calling_chat_predict_and_call(engine):
    """chat_with_tools under a required choice gives a schema-valid call; predict_and_call runs it;
    streamed replies build up the same call."""
    from llama_index.core.tools import FunctionTool

    tool = FunctionTool.from_defaults(fn=get_weather)
    llm = AsyncLLM(engine=engine, max_tokens=60, temperature=0)
    assert llm.metadata.is_function_calling_model
    response = llm.chat_with_tools([tool], user_msg="What is the weather in Rome?", tool_required=True)
    (selection,) = llm.get_tool_calls_from_response(response)
    assert selection.tool_name == "get_weather" and set(selection.tool_kwargs) == {"location"}
    assert selection.tool_id.startswith("call_") and response.raw["finish_reason"] == "tool_calls"
    streamed = list(llm.stream_chat_with_tools([tool], user_msg="What is the weather in Rome?", tool_required=True))
    (last,) = llm.get_tool_calls_from_response(streamed[-1])
    assert last.tool_kwargs == selection.tool_kwargs
    out = llm.predict_and_call([tool], user_msg="What is the weather in Rome?", tool_required=True)
    assert out.response == get_weather(**selection.tool_kwargs) and not out.sources[0].is_error
    with pytest.raises(ValueError, match="tool call"):
        llm.get_tool_calls_from_response(llm.chat(CHAT))


def test_function_agent_calls_one_tool(engine):
    """A FunctionAgent whose first turn must call the tool (initial_tool_choice: the 135M default
    model answers in prose when it may choose); the tool's result goes back through the chat
    template as a tool message and the agent ends on a free-text answer."""
    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

    calls = []

    def weather(location: str) -> str:
        """Get the weather at a location."""
        calls.append(location)
        return f"It is sunny in {location}."

    llm = AsyncLLM(engine=engine, max_tokens=48, temperature=0)
    agent = FunctionAgent(tools=[weather], llm=llm, initial_tool_choice="weather", streaming=False,
                          system_prompt="Answer with the tool's result.")

    async def run():
        handler = agent.run(user_msg="What is the weather in Paris?", max_iterations=4)
        results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
        return results, await handler

    results, answer = anyio.run(run)
    assert len(calls) == 1 and results[0].tool_name == "weather" and results[0].tool_kwargs == {"location": calls[0]}
    assert [c.tool_name for c in answer.tool_calls] == ["weather"]  # the calls the run made
    assert answer.response.content.strip() and all(b.block_type == "text" for b in answer.response.blocks)


class City(BaseModel):
    name: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=40)


def test_structured_predict_decodes_under_the_schema(engine):
    from llama_index.core.prompts import PromptTemplate

    llm = AsyncLLM(engine=engine, max_tokens=60, temperature=0)
    prompt = PromptTemplate("Describe the city of {city}.")
    city = llm.structured_predict(City, prompt, city="Paris")
    assert isinstance(city, City)
    assert anyio.run(lambda: llm.astructured_predict(City, prompt, city="Paris")) == city


def test_lora_request_in_process_and_adapter_by_model_name_remote(engine, tmp_path):
    """In process the adapter is a LoRARequest; over HTTP the served adapter's name as `model`."""
    folder = str(tmp_path / "a1")
    write_random_adapter(folder, engine.engine.core.checkpoint.config, rank=8, seed=3, alpha=64)
    lora = LoRARequest("a1", 1, folder)
    base = AsyncLLM(engine=engine, max_tokens=16, temperature=0).chat(CHAT).message.content
    expected = AsyncLLM(engine=engine, max_tokens=16, temperature=0, lora_request=lora).chat(CHAT).message.content
    assert expected != base
    assert AsyncLLM(engine=engine, max_tokens=16, temperature=0).chat(CHAT, lora_request=lora).message.content \
        == expected
    srv = RunningServer(build_app(engine, lora_modules=[f"a1={folder}"], run_lifespan=False), lifespan="off")
    try:
        remote = AsyncLLM(base_url=srv.url, model="a1", max_tokens=16, temperature=0)
        assert remote.metadata.model_name == "a1"
        assert remote.chat(CHAT).message.content == expected
        assert AsyncLLM(base_url=srv.url, max_tokens=16, temperature=0).chat(CHAT).message.content == base
    finally:
        srv.stop()
