"""POST /v1/chat/completions: messages (tools and tool results too) → a reply, its reasoning and tool calls."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from asyncllm.errors import InvalidRequestError
from asyncllm.outputs import CompletionOutput
from asyncllm.sampling_params import RequestOutputKind
from asyncllm.server.protocol import ChatCompletionRequest, ChatMessage, now, usage
from asyncllm.server.serving import (
    ServerContext,
    check_context,
    new_id,
    openai_finish_reason,
    parse_body,
    prompt_logprobs_json,
    sampling_params,
    sse_response,
    submit_all,
    until_disconnected,
)
from asyncllm.tools import ChatDeltaStreamer, get_reasoning_parser, plan_tools
from asyncllm.tools.choice import apply_plan
from asyncllm.tools.template import render_chat


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if (part.type, part.text is None, part.image_url is None) not in (("text", False, True),
                                                                                  ("image_url", True, False)):
                    raise InvalidRequestError(f"messages[{i}].content[{j}]: content parts are text (with its text) "
                                              "or image_url (with its url)", param="messages")
            if any(part.type == "image_url" for part in content):  # parts kept: the template places the images
                content = [{"type": "text", "text": part.text} if part.type == "text"
                           else {"type": "image_url", "image_url": part.image_url} for part in content]
            else:
                content = "\n".join(part.text for part in content)
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


# Arguments of the renderer (ours and transformers' apply_chat_template) and the names the
# template gets from it: chat_template_kwargs may not replace them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "tokenizer", "messages", "conversation", "add_generation_prompt", "tools", "documents", "chat_template",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "kwargs"})


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Template variables a request may set: identifiers that are not the renderer's own arguments."""
    for key in kwargs or {}:
        if not key.isidentifier() or key.startswith("_") or key in _RESERVED_TEMPLATE_KWARGS:
            raise InvalidRequestError(f"chat_template_kwargs may not set {key!r} (a renderer argument or not a "
                                      "template variable name)", param=f"chat_template_kwargs.{key}")
    return dict(kwargs or {})


def chat_prompt(ctx: ServerContext, messages: list[ChatMessage], add_generation_prompt: bool,
                kwargs: dict[str, Any] | None, tools: list[dict] | None = None) -> dict[str, Any]:
    return render_chat(ctx.engine.tokenizer, message_dicts(messages), tools, add_generation_prompt,
                       check_template_kwargs(kwargs), takes_images=ctx.engine.engine.takes_images)


def _chat_logprobs(c: CompletionOutput, top: int) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for token_id, position in zip(c.token_ids, c.logprobs):
        chosen = position[token_id]
        alternatives = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top),
                              key=lambda lp: lp.rank)
        seen = set()
        tops = []
        for lp in alternatives:
            if lp.rank in seen:
                continue
            seen.add(lp.rank)
            tops.append({"token": lp.decoded_token, "logprob": lp.logprob,
                         "bytes": list((lp.decoded_token or "").encode())})
        content.append({"token": chosen.decoded_token, "logprob": chosen.logprob,
                        "bytes": list((chosen.decoded_token or "").encode()), "top_logprobs": tops[:top]})
    return {"content": content}


def _choice(c: CompletionOutput, parser, reasoning, top: int) -> dict:
    """One choice of a non-streamed reply: reasoning, content and tool calls read from the text
    (by the same parsers, with final=True, that the streamed deltas come from)."""
    content: str | None = c.text
    message: dict[str, Any] = {"role": "assistant"}
    if reasoning is not None:
        message["reasoning_content"], content = reasoning.extract(c.text)
    reason = openai_finish_reason(c.finish_reason)
    if parser is not None:
        extracted = parser.extract(content or "")
        content = extracted.content
        if extracted.calls:
            message["tool_calls"] = [call.to_openai() for call in extracted.calls]
            reason = "tool_calls" if reason == "stop" else reason
    message["content"] = content
    return {"index": c.index, "message": message, "logprobs": _chat_logprobs(c, top), "finish_reason": reason}


async def create_chat_completion(request: Request, ctx: ServerContext) -> Response:
    body = await parse_body(request, ChatCompletionRequest, ctx)
    lora = ctx.check_model(body.model)
    served = ctx.response_model(lora)
    plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, auto_parser=ctx.auto_tool_parser)
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
    top = body.top_logprobs or 0
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    params = sampling_params(body, max_tokens=max_tokens, logprobs=top if body.logprobs else None, kind=kind)
    params = apply_plan(params, plan)
    reasoning = get_reasoning_parser(ctx.reasoning_parser) if ctx.reasoning_parser else None
    prompt = chat_prompt(ctx, body.messages, body.add_generation_prompt, body.chat_template_kwargs, plan.tools)
    request_id = new_id("chatcmpl")
    engine = ctx.engine
    prepared = engine.prepare(prompt, params, request_id, body.priority, lora_request=lora)
    check_context(ctx, prepared, max_tokens)
    await engine.wait_for_grammar(prepared)  # a structure that cannot compile is a 400, before streaming
    (outputs,) = submit_all(engine, [prepared])  # a full queue is a 429 here, before any response starts
    created = now()

    def chunk(choices: list[dict], **extra: Any) -> dict:
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": served,
                "choices": choices, **extra}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[dict]:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(params.n)])
            completion_tokens = 0
            first = True
            texts = [""] * params.n
            streamers = [ChatDeltaStreamer(plan.parser, reasoning) for _ in range(params.n)]
            async for out in outputs:
                if first and body.prompt_logprobs is not None:
                    yield chunk([], prompt_logprobs=prompt_logprobs_json(out))
                first = False
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    texts[c.index] += c.text
                    finished = c.finish_reason is not None
                    delta = streamers[c.index].delta(texts[c.index], final=finished) if c.text or finished else {}
                    if not delta and not finished:
                        continue
                    reason = openai_finish_reason(c.finish_reason)
                    if finished and streamers[c.index].called_tools and reason == "stop":
                        reason = "tool_calls"
                    yield chunk([{"index": c.index, "delta": delta, "logprobs": _chat_logprobs(c, top),
                                  "finish_reason": reason}])
            if include_usage:
                n_prompt = len(prepared.prompt_token_ids)
                yield chunk([], usage=usage(n_prompt, completion_tokens))

        return sse_response(ctx, events())

    async def run():
        async for out in outputs:
            if out.finished:
                return out
        raise RuntimeError("request ended without output")

    final = await until_disconnected(request, run, [outputs])
    choices = [_choice(c, plan.parser, reasoning, top) for c in sorted(final.outputs, key=lambda c: c.index)]
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    n_prompt = len(prepared.prompt_token_ids)
    response = {"id": request_id, "object": "chat.completion", "created": created, "model": served,
                "choices": choices, "usage": usage(n_prompt, completion_tokens)}
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = prompt_logprobs_json(final)
    return JSONResponse(response)
