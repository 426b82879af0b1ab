"""Tools and tool messages into the chat template.

Templates that take `tools` (Qwen, Llama 3.1+, Mistral, Hermes, SmolLM3) get them as
transformers passes them, and assistant `tool_calls` with their arguments as objects (the
templates `tojson` them; OpenAI sends a JSON string). A template that never mentions tools
(the default SmolLM2, plain ChatML) would drop them silently, so the tools are described in a
system message instead, with the Hermes format (`<tool_call>` tags, what `--tool-call-parser
hermes` reads); earlier calls become that text and tool results `<tool_response>` user turns.
"""
from __future__ import annotations

import json
from typing import Any

from asyncllm.errors import InvalidRequestError

_FALLBACK_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>")


def template_takes_tools(chat_template: Any) -> bool:
    templates = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    return any(isinstance(t, str) and "tools" in t for t in templates)


def _arguments_object(arguments: Any, where: str) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        raise InvalidRequestError(f"{where}.function.arguments is not valid JSON", param="messages") from None


def _call_text(call: dict) -> str:
    function = call.get("function", {})
    return "<tool_call>\n" + json.dumps({"name": function.get("name"), "arguments": function.get("arguments")},
                                        ensure_ascii=False) + "\n</tool_call>"


def prepare_messages(messages: list[dict[str, Any]], tools: list[dict] | None,
                     chat_template: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template kwargs) for the template, given the request's tools (None: none)."""
    native = template_takes_tools(chat_template)
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for j, call in enumerate(message["tool_calls"]):
                call = dict(call)
                function = dict(call.get("function") or {})
                function["arguments"] = _arguments_object(function.get("arguments", {}), f"messages[{i}].tool_calls[{j}]")
                call["function"] = function
                calls.append(call)
            message["tool_calls"] = calls
            if not native:
                text = "\n".join(_call_text(c) for c in calls)
                message["content"] = f"{message.get('content') or ''}\n{text}".strip("\n")
                del message["tool_calls"]
        if message.get("role") == "tool" and not native:
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        out.append(message)
    if not tools:
        return out, {}
    if native:
        return out, {"tools": tools}
    described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    system = _FALLBACK_SYSTEM.format(tools=described)
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, {}


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict] | None,
                add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None,
                takes_images: bool = True) -> dict[str, Any]:
    """The prompt (text and its token ids) of a chat with these tools, as the server, `LLM.chat`
    and the in-process framework backends all render it; image parts go in `multi_modal_data`
    (refused at once where the model `takes_images` not, before its template sees them)."""
    from asyncllm.engine.input_processor import apply_chat_template
    from asyncllm.multimodal.image_loading import split_image_parts

    messages, images = split_image_parts(messages)  # each image part → {"type": "image"}: the template places it
    if images and not takes_images:
        raise InvalidRequestError("this model does not take image input (a LLaVA-style model does)", "messages")
    rendered, tool_kwargs = prepare_messages(messages, tools, tokenizer.chat_template)
    text = apply_chat_template(tokenizer, rendered, add_generation_prompt, **(template_kwargs or {}), **tool_kwargs)
    prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    if images:  # loaded, checked and expanded into placeholders by the engine's InputProcessor
        prompt["multi_modal_data"] = {"image": images}
    return prompt


# Markers by which a template that takes tools shows the call format it teaches the model.
_TEMPLATE_CALL_FORMATS = (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
                          ("<|python_tag|>", "llama3_json"), ("[func_name1(", "pythonic"))


def guess_tool_parser(chat_template: Any) -> str | None:
    """The parser for free ("auto") replies when none was named: `hermes` for a template without
    tools (the Hermes-format system turn above teaches that format), else the format the template
    itself shows; None when it shows none of the known ones."""
    if not template_takes_tools(chat_template):
        return "hermes"
    templates = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    text = "\n".join(t for t in templates if isinstance(t, str))
    return next((name for marker, name in _TEMPLATE_CALL_FORMATS if marker in text), None)
