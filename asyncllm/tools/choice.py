"""A chat request's `tools` and `tool_choice` → how to prompt, decode and read the reply.

- `none`: the tools are rendered (as vLLM does) but the reply is plain content.
- `auto`: free decoding, read by the server's `--tool-call-parser` (which
  `--enable-auto-tool-choice` must allow; otherwise a 400, as vLLM answers).
- `required`: decoded under a JSON schema, an array of `{"name": one of the tools, "parameters":
  its schema}` (at most one item when `parallel_tool_calls` is false), so the calls always parse
  and their arguments match a tool's schema.
- a named function: decoded under that function's parameters schema; the reply is its arguments.
Tools are OpenAI function tools; anything else is a 400 naming the field.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from asyncllm.errors import InvalidRequestError
from asyncllm.sampling.structured import StructuredOutputs
from asyncllm.sampling_params import SamplingParams
from asyncllm.tools.parsers import NamedToolParser, RequiredJsonToolParser, ToolParser, get_tool_parser

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    tools: list[dict] | None  # what the template gets
    parser: ToolParser | None  # how the reply is read (None: plain content)
    structured: StructuredOutputs | None  # the schema the reply is decoded under
    choice: str  # "none" | "auto" | "required" | "named"


def check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of function tools", param="tools")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequestError(f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'",
                                      param=f"{where}.function.name")
        if name in names:
            raise InvalidRequestError(f"{where}: two tools are named {name!r}", param=f"{where}.function.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type", "object") != "object"):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema of an object",
                                      param=f"{where}.function.parameters")
    return tools


def parameters_schema(tool: dict) -> dict:
    return tool["function"].get("parameters") or _EMPTY_PARAMETERS


def required_schema(tools: list[dict], parallel_tool_calls: bool) -> dict:
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": parameters_schema(t)},
              "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None = None, *,
               auto_parser: str | None = None) -> ToolPlan:
    """`auto_parser`: the server's --tool-call-parser when --enable-auto-tool-choice is on."""
    if tools is not None:
        tools = check_tools(tools) or None
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolPlan(tools, None, None, "none")
    if tool_choice == "auto":
        if not tools:
            return ToolPlan(None, None, None, "none")
        if auto_parser is None:
            raise InvalidRequestError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                      'to be set (tool_choice "required" or a named function work without them)',
                                      param="tool_choice")
        return ToolPlan(tools, get_tool_parser(auto_parser), None, "auto")
    if not tools:
        raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
    if tool_choice == "required":
        return ToolPlan(tools, RequiredJsonToolParser(),
                        StructuredOutputs(json=required_schema(tools, parallel_tool_calls is not False)), "required")
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools",
                                      param="tool_choice.function.name")
        return ToolPlan(tools, NamedToolParser(name), StructuredOutputs(json=parameters_schema(tool)), "named")
    raise InvalidRequestError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                              '"function": {"name": ...}}', param="tool_choice")


def apply_plan(params: SamplingParams, plan: ToolPlan) -> SamplingParams:
    """The request's sampling parameters under the plan: the tools' schema for required and named
    choices, and the parser's special-token markers kept in the text."""
    if plan.structured is not None:
        if params.structured_outputs is not None:
            raise InvalidRequestError(f'tool_choice "{plan.choice}" decodes under the tools\' schema; it cannot be '
                                      "combined with response_format or other structured outputs", param="tool_choice")
        params = dataclasses.replace(params, structured_outputs=plan.structured)
    if plan.parser is not None and not plan.parser.skip_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)  # the parser's markers are special tokens
    return params
