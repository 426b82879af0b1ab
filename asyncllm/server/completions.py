"""POST /v1/completions."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from asyncllm.errors import InvalidRequestError
from asyncllm.outputs import CompletionOutput, RequestOutput
from asyncllm.sampling_params import RequestOutputKind
from asyncllm.server.protocol import CompletionRequest, now, usage
from asyncllm.server.serving import (
    ServerContext,
    check_context,
    merge,
    new_id,
    openai_finish_reason,
    parse_body,
    sampling_params,
    sse_response,
    until_disconnected,
)


def _prompts(body: CompletionRequest) -> list[Any]:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(t, int) for t in p):
        return [{"prompt_token_ids": p}]
    if not p:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    return [x if isinstance(x, str) else {"prompt_token_ids": x} for x in p]


def _logprobs_block(completion: CompletionOutput, text_offset: int, k: int) -> dict | None:
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        chosen = position[token_id]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        # The k most likely tokens (the chosen one is listed only if it is among them).
        top.append({lp.decoded_token: lp.logprob for lp in position.values() if lp.rank is not None and lp.rank <= k})
        offsets.append(offset)
        offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


async def create_completion(request: Request, ctx: ServerContext) -> Response:
    body = await parse_body(request, CompletionRequest)
    ctx.check_model(body.model)
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise InvalidRequestError("best_of must equal n (best-of ranking is not supported)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported", param="echo")
    prompts = _prompts(body)
    if len(prompts) > ctx.max_prompts_per_request:
        raise InvalidRequestError(f"at most {ctx.max_prompts_per_request} prompts per request", param="prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, kind=kind)
    request_id = new_id("cmpl")
    engine = ctx.engine
    prepared = [engine.prepare(p, params, f"{request_id}-{i}", body.priority) for i, p in enumerate(prompts)]
    for item in prepared:
        check_context(ctx, item, max_tokens)
    await engine.wait_for_grammar(prepared[0])  # one shared compilation; a bad structure is a 400 here
    created = now()
    n = params.n

    def choice_index(prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * n + completion.index

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[dict]:
            completion_tokens = 0
            echoed: set[int] = set()
            offsets: dict[int, int] = {}
            async for i, out in merge([engine.generate_prepared(p) for p in prepared]):
                for c in out.outputs:
                    index = choice_index(i, c)
                    text = c.text
                    if body.echo and index not in echoed:
                        echoed.add(index)
                        text = (out.prompt or "") + text
                    completion_tokens += len(c.token_ids)
                    lp = _logprobs_block(c, offsets.get(index, 0), body.logprobs or 0)
                    offsets[index] = offsets.get(index, 0) + len(c.text)
                    if not text and c.finish_reason is None and lp is None:
                        continue
                    yield {"id": request_id, "object": "text_completion", "created": created,
                           "model": ctx.model_name,
                           "choices": [{"index": index, "text": text, "logprobs": lp,
                                        "finish_reason": openai_finish_reason(c.finish_reason), "stop_reason": c.stop_reason}]}
            if include_usage:
                prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
                yield {"id": request_id, "object": "text_completion", "created": created, "model": ctx.model_name,
                       "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

        return sse_response(events())

    async def run() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(prepared)
        async for i, out in merge([engine.generate_prepared(p) for p in prepared]):
            if out.finished:
                finals[i] = out
        return finals  # type: ignore[return-value]

    finals = await until_disconnected(request, run)
    choices = []
    completion_tokens = 0
    for i, out in enumerate(finals):
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            text = (out.prompt or "") + c.text if body.echo else c.text
            choices.append({"index": choice_index(i, c), "text": text, "logprobs": _logprobs_block(c, 0, body.logprobs or 0),
                            "finish_reason": openai_finish_reason(c.finish_reason), "stop_reason": c.stop_reason})
    prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
    return JSONResponse({
        "id": request_id, "object": "text_completion", "created": created, "model": ctx.model_name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })
