"""LLM.chat(tools=...): the tools reach the prompt (a Hermes-format system turn for the default
model's template, which has none), and the hermes parser reads a call from the output."""
import json

from asyncllm import SamplingParams
from asyncllm.sampling.structured import StructuredOutputs
from asyncllm.tools import get_tool_parser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_llm_chat_renders_tools_and_the_reply_parses(default_llm):
    shape = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,10}"\}\}\n</tool_call>'
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputs(regex=shape))
    (out,) = default_llm.chat([{"role": "user", "content": "Weather in Rome?"}], params, use_tqdm=False, tools=TOOLS)
    assert "<tools>" in out.prompt and '"get_weather"' in out.prompt
    extracted = get_tool_parser("hermes").extract(out.outputs[0].text)
    (call,) = extracted.calls
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    (plain,) = default_llm.chat([{"role": "user", "content": "Weather in Rome?"}], params, use_tqdm=False)
    assert "<tools>" not in plain.prompt
