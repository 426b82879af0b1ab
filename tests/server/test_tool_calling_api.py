"""Tool calling through the OpenAI API with the real `openai` client, on the default 135M model:
required and named calls decoded under the tools' schemas (always valid), auto calls read by
the hermes parser, streamed deltas that reassemble to the non-streamed call, tool results
rendered back, reasoning moved to reasoning_content, and 400s for what cannot be done."""
import json

import httpx
import jsonschema
import openai
import pytest

from asyncllm.server import build_app
from server_helpers import RunningServer

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "unit", "days"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a timezone",
                                      "parameters": {"type": "object", "properties": {
                                          "timezone": {"type": "string", "maxLength": 30}},
                                          "required": ["timezone"]}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def tool_server(engine):
    srv = RunningServer(build_app(engine, run_lifespan=False, enable_auto_tool_choice=True,
                                  tool_call_parser="hermes", reasoning_parser="qwen3"), lifespan="off")
    yield srv
    srv.stop()


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x")


def _valid(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed_calls(stream):
    calls, finish = {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            entry["id"] = delta.id or entry["id"]
            if delta.function.name:
                entry["name"] = delta.function.name
            entry["arguments"] += delta.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


def test_required_gives_a_valid_call_every_time_at_temperature_0_8(server):
    client = _client(server)
    choices = [c for seed in (1, 2) for c in client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.8, seed=seed, max_tokens=120,
        n=10).choices]
    assert len(choices) == 20
    for choice in choices:
        # "length": the model went on adding parallel calls past max_tokens; the whole ones are kept.
        assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            _valid(call)


def test_named_tool_is_always_called_with_valid_arguments(server):
    client = _client(server)
    choice = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                       temperature=0.8, seed=2, max_tokens=60, n=8)
    for c in r.choices:
        (call,) = c.message.tool_calls
        assert call.function.name == "get_time"
        _valid(call)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_deltas_reassemble_to_the_non_streamed_call(server, tool_choice):
    client = _client(server)
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, finish = _streamed_calls(client.chat.completions.create(**kwargs, stream=True))
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls)


def test_parallel_tool_calls_false_gives_one_call(server):
    r = _client(server).chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, temperature=0.8, seed=3, max_tokens=120,
                                                n=4)
    assert all(len(c.message.tool_calls) == 1 for c in r.choices)


def test_a_tool_result_goes_back_through_the_template(server):
    client = _client(server)
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=120).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny, 24 C"}'}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    # The template (ChatML without tools: described in a system turn) saw the call and the result.
    tokens = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": history}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert "<tool_call>" in text and call.function.name in text and "sunny, 24 C" in text


def test_auto_reads_hermes_calls_from_free_replies(tool_server):
    """The 135M model does not call tools on its own, so its reply is steered into the Hermes shape with
    a regex (structured outputs); the hermes parser reads the free reply as vLLM's would."""
    client = _client(tool_server)
    shape = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", "unit": "celsius", ' \
            r'"days": [1-7]\}\}\n</tool_call>'
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                  extra_body={"guided_regex": shape})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather"
    _valid(call)
    calls, finish = _streamed_calls(client.chat.completions.create(**kwargs, stream=True))
    assert finish == "tool_calls" and [(c["name"], c["arguments"]) for c in calls] == \
        [(call.function.name, call.function.arguments)]
    # A plain reply stays content.
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=20)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


def test_reasoning_goes_to_reasoning_content(tool_server):
    client = _client(tool_server)
    shape = r"<think>\nThe user asks about [a-z ]{5,20}\.\n</think>\n\nIt is [a-z ]{3,20}\."
    kwargs = dict(model=MODEL, messages=ASK, temperature=0, max_tokens=60, extra_body={"guided_regex": shape})
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert message.reasoning_content.startswith("The user asks about") and message.content.startswith("It is")
    reasoning = content = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS}, "tool_choice"),  # auto without --enable-auto-tool-choice
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
])
def test_what_cannot_be_done_is_a_400_naming_the_field(server, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        _client(server).chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **body)
    assert info.value.body["param"] == param
