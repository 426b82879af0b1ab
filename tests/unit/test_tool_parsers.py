"""Tool-call and reasoning parsers on model-shaped text: whole replies, malformed ones (they stay
content), and streaming: fed at every cut, the deltas reassemble to the non-streamed message."""
import json

import pytest

from asyncllm.errors import InvalidRequestError
from asyncllm.tools import ChatDeltaStreamer, get_reasoning_parser, get_tool_parser, plan_tools
from asyncllm.tools.parsers import NamedToolParser, RequiredJsonToolParser

WEATHER = {"city": "Paris", "unit": "celsius"}

CASES = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
         None, [("get_weather", WEATHER)]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
         "Let me check.\n", [("get_weather", WEATHER), ("get_time", {})]),
        ("The weather is nice <b>today</b>.", "The weather is nice <b>today</b>.", []),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', '<tool_call>\n{"name": "get_weather", '
         '"arguments": {"city": "Par', []),  # cut by max_tokens: content
        ('<tool_call>\n{"name": "get_weather" "arguments": {}}\n</tool_call>',
         '<tool_call>\n{"name": "get_weather" "arguments": {}}\n</tool_call>', []),  # missing comma
        ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>', None, [("f", {"x": 1})]),
        ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
         '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
         [("get_weather", WEATHER)]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
         '{"name": "get_time", "parameters": {}}', None, [("get_weather", WEATHER), ("get_time", {})]),
        ("Paris is sunny.", "Paris is sunny.", []),
        ('{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ', []),
        ('{"answer": 42}', '{"answer": 42}', []),  # JSON but not a call
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]', None,
         [("get_weather", WEATHER)]),
        ('Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
         '{"name": "get_time", "arguments": {}}]', "Sure. ", [("get_weather", WEATHER), ("get_time", {})]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}', None, [("get_weather", WEATHER)]),
        ("[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
        ("No tools needed.", "No tools needed.", []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", unit="celsius")]', None, [("get_weather", WEATHER)]),
        ("[get_weather(city='Paris', unit='celsius'), get_time()]", None, [("get_weather", WEATHER), ("get_time", {})]),
        ('<|python_start|>[get_weather(city="Paris", unit="celsius")]<|python_end|>', None, [("get_weather", WEATHER)]),
        ("[1] First, the weather.", "[1] First, the weather.", []),
        ('[get_weather(city="Par', '[get_weather(city="Par', []),
        ("[get_weather(city=open('x'))]", "[get_weather(city=open('x'))]", []),  # not a literal: never evaluated
    ],
}


def _flat(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("name,case", [(n, i) for n, cases in CASES.items() for i in range(len(cases))])
def test_parser_reads_whole_replies(name, case):
    text, content, calls = CASES[name][case]
    extracted = get_tool_parser(name).extract(text)
    assert extracted.content == content
    assert _flat(extracted.calls) == calls
    assert all(c.id.startswith("call_") for c in extracted.calls)


def _stream(streamer, text, step):
    pieces = {"content": "", "reasoning_content": ""}
    calls = []
    for end in list(range(step, len(text), step)) + [len(text)]:
        delta = streamer.delta(text[:end], final=end == len(text))
        for key in pieces:
            pieces[key] += delta.get(key, "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(calls):
                assert call["id"].startswith("call_") and call["type"] == "function"
                calls.append([call["function"]["name"], call["function"]["arguments"]])
            else:
                assert "id" not in call and "name" not in call["function"]
                calls[call["index"]][1] += call["function"]["arguments"]
    return pieces, calls


@pytest.mark.parametrize("name,case", [(n, i) for n, cases in CASES.items() for i in range(len(cases))])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_deltas_reassemble_to_the_whole_reply(name, case, step):
    text, content, calls = CASES[name][case]
    whole = get_tool_parser(name).extract(text)
    pieces, streamed = _stream(ChatDeltaStreamer(get_tool_parser(name), None), text, step)
    assert pieces["content"] == (whole.content or "")
    if calls:
        assert [(n, json.loads(a)) for n, a in streamed] == _flat(whole.calls)
        assert [a for _, a in streamed] == [c.arguments for c in whole.calls]
    # A reply that looked like a call until it was cut or broke is content in the end; a call
    # whose name was already sent stays in the stream, partial (a stream cannot take it back).


def test_content_that_only_looks_like_a_marker_start_is_held_then_released():
    streamer = ChatDeltaStreamer(get_tool_parser("hermes"), None)
    assert streamer.delta("Use <tool") == {"content": "Use "}
    assert streamer.delta("Use <tools wisely") == {"content": "<tools wisely"}


@pytest.mark.parametrize("parser", ["deepseek_r1", "qwen3"])
def test_reasoning_moves_to_reasoning_content(parser):
    reasoning = get_reasoning_parser(parser)
    text = "<think>\nThe user wants 2+2.\n</think>\n\nIt is 4."
    assert reasoning.extract(text) == ("The user wants 2+2.\n", "It is 4.")
    pieces, _ = _stream(ChatDeltaStreamer(None, reasoning), text, 2)
    assert pieces == {"reasoning_content": "The user wants 2+2.\n", "content": "It is 4."}
    # Without the opening tag: R1's template opened it in the prompt; Qwen3 answered without thinking.
    bare = "2+2 is simple.</think>It is 4."
    assert reasoning.extract(bare) == (("2+2 is simple.", "It is 4.") if parser == "deepseek_r1" else (None, bare))
    assert reasoning.extract("It is 4.") == ((("It is 4.", "") if parser == "deepseek_r1" else (None, "It is 4.")))


def test_reasoning_then_tool_calls():
    streamer = ChatDeltaStreamer(get_tool_parser("hermes"), get_reasoning_parser("qwen3"))
    text = '<think>Need weather.</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    pieces, calls = _stream(streamer, text, 5)
    assert pieces == {"reasoning_content": "Need weather.", "content": ""}
    assert calls == [["get_weather", '{"city": "Paris"}']]


def test_structured_replies_of_required_and_named():
    required = RequiredJsonToolParser().extract('[{"name": "get_weather", "parameters": {"city": "Paris"}}]')
    assert required.content is None and _flat(required.calls) == [("get_weather", {"city": "Paris"})]
    named = NamedToolParser("get_weather")
    assert _flat(named.extract('{"city": "Paris"}').calls) == [("get_weather", {"city": "Paris"})]
    pieces, calls = _stream(ChatDeltaStreamer(named, None), '{"city": "Paris"}', 4)
    assert calls == [["get_weather", '{"city": "Paris"}']] and pieces["content"] == ""


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time"}}]


def test_tool_choice_plans():
    assert plan_tools(None, None).choice == "none"
    assert plan_tools(TOOLS, "none").parser is None
    assert plan_tools(TOOLS, None, auto_parser="hermes").choice == "auto"
    required = plan_tools(TOOLS, "required", parallel_tool_calls=False)
    assert required.structured.json["maxItems"] == 1 and len(required.structured.json["items"]["anyOf"]) == 2
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.structured.json == TOOLS[0]["function"]["parameters"] and named.choice == "named"


@pytest.mark.parametrize("tools,choice,param", [
    (TOOLS, None, "tool_choice"),  # auto without --enable-auto-tool-choice
    (TOOLS, "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ([{"type": "retrieval"}], "required", "tools[0]"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "required", "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "required",
     "tools[0].function.parameters"),
    (TOOLS + TOOLS[:1], "required", "tools[2].function.name"),
])
def test_bad_tools_are_400s_naming_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(tools, choice)
    assert info.value.param == param


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("qwen_xml")
