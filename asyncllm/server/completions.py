"""POST /v1/completions."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from asyncllm.beam_search import BeamSearchParams
from asyncllm.errors import InvalidRequestError
from asyncllm.lora.request import LoRARequest
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
    prompt_list,
    prompt_logprobs_json,
    sampling_params,
    sse_response,
    submit_all,
    until_disconnected,
)


def _logprobs_block(token_ids: list[int], positions: list, text_offset: int, k: int) -> dict:
    """OpenAI's legacy logprobs object over the given tokens (a position may be None: the prompt's first)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        if position is None:
            tokens.append(None)
            token_logprobs.append(None)
            top.append(None)
            offsets.append(offset)
            continue
        chosen = position[token_id]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        # The k most likely tokens (the chosen one is listed only if it is among them).
        top.append({lp.decoded_token: lp.logprob for lp in position.values() if lp.rank is not None and lp.rank <= k})
        offsets.append(offset)
        offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _choice_logprobs(out: RequestOutput, completion: CompletionOutput, text_offset: int, k: int,
                     echo_prompt: str | None) -> dict | None:
    """The completion's logprobs; with echo (`echo_prompt`: the first prompt token's text), preceded
    by the prompt's, as OpenAI gives them: the first token has no logprob."""
    if completion.logprobs is None:
        return None
    block = _logprobs_block(completion.token_ids, completion.logprobs, text_offset, k)
    if echo_prompt is None or out.prompt_logprobs is None:
        return block
    prompt_block = _logprobs_block(out.prompt_token_ids, out.prompt_logprobs, 0, k)
    prompt_block["tokens"][0] = echo_prompt
    prompt_block["text_offset"] = [0] + [o + len(echo_prompt) for o in prompt_block["text_offset"][1:]]
    shift = len(out.prompt or "")
    return {"tokens": prompt_block["tokens"] + block["tokens"],
            "token_logprobs": prompt_block["token_logprobs"] + block["token_logprobs"],
            "top_logprobs": prompt_block["top_logprobs"] + block["top_logprobs"],
            "text_offset": prompt_block["text_offset"] + [o + shift for o in block["text_offset"]]}


async def create_completion(request: Request, ctx: ServerContext) -> Response:
    body = await parse_body(request, CompletionRequest, ctx)
    lora = ctx.check_model(body.model)
    served = ctx.response_model(lora)
    if body.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix")
    prompts = prompt_list(body.prompt, "prompt")
    if len(prompts) > ctx.max_prompts_per_request:
        raise InvalidRequestError(f"at most {ctx.max_prompts_per_request} prompts per request", param="prompt")
    if body.use_beam_search:
        return await _beam_search_completion(ctx, body, prompts, lora)
    if body.length_penalty != 1.0:
        raise InvalidRequestError("length_penalty applies to beam search only (use_beam_search)",
                                  param="length_penalty")
    if body.stream and body.best_of is not None and body.best_of > body.n:
        raise InvalidRequestError("best_of > n cannot stream (the best are known only at the end), as in vLLM",
                                  param="best_of")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    echo_logprobs = body.echo and body.logprobs is not None
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, kind=kind,
                             prompt_logprobs=max(body.logprobs or 0, body.prompt_logprobs or 0)
                             if echo_logprobs else None)
    request_id = new_id("cmpl")
    engine = ctx.engine
    prepared = [engine.prepare(p, params, f"{request_id}-{i}", body.priority, lora_request=lora)
                for i, p in enumerate(prompts)]
    for item in prepared:
        check_context(ctx, item, max_tokens)
    await engine.wait_for_grammar(prepared[0])  # one shared compilation; a bad structure is a 400 here
    streams = submit_all(engine, prepared)  # a full queue is a 429 here, before any response starts
    created = now()
    n = params.n
    k = body.logprobs or 0
    show_prompt_logprobs = body.prompt_logprobs is not None

    def echoed_first_token(out: RequestOutput) -> str:
        return engine.tokenizer.decode(out.prompt_token_ids[:1])

    def choice_index(prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * n + completion.index

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[dict]:
            completion_tokens = 0
            echoed: set[int] = set()
            offsets: dict[int, int] = {}
            async for i, out in merge(streams):
                for c in out.outputs:
                    index = choice_index(i, c)
                    text = c.text
                    first = index not in echoed
                    echoed.add(index)
                    if body.echo and first:
                        text = (out.prompt or "") + text
                    completion_tokens += len(c.token_ids)
                    lp = _choice_logprobs(out, c, offsets.get(index, 0), k,
                                          echoed_first_token(out) if body.echo and first else None)
                    offsets[index] = offsets.get(index, 0) + len(text)
                    if not text and c.finish_reason is None and lp is None:
                        continue
                    choice = {"index": index, "text": text, "logprobs": lp,
                              "finish_reason": openai_finish_reason(c.finish_reason), "stop_reason": c.stop_reason}
                    if show_prompt_logprobs and first:
                        choice["prompt_logprobs"] = prompt_logprobs_json(out)
                    yield {"id": request_id, "object": "text_completion", "created": created,
                           "model": served, "choices": [choice]}
            if include_usage:
                prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
                yield {"id": request_id, "object": "text_completion", "created": created, "model": served,
                       "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

        return sse_response(ctx, events())

    async def run() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(prepared)
        async for i, out in merge(streams):
            if out.finished:
                finals[i] = out
        return finals  # type: ignore[return-value]

    finals = await until_disconnected(request, run, streams)
    choices = []
    completion_tokens = 0
    for i, out in enumerate(finals):
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            text = (out.prompt or "") + c.text if body.echo else c.text
            lp = _choice_logprobs(out, c, 0, k, echoed_first_token(out) if body.echo else None)
            choice = {"index": choice_index(i, c), "text": text, "logprobs": lp,
                      "finish_reason": openai_finish_reason(c.finish_reason), "stop_reason": c.stop_reason}
            if show_prompt_logprobs:
                choice["prompt_logprobs"] = prompt_logprobs_json(out)
            choices.append(choice)
    prompt_tokens = sum(len(p.prompt_token_ids) for p in prepared)
    return JSONResponse({
        "id": request_id, "object": "text_completion", "created": created, "model": served,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })


_BEAM_SEARCH_UNSUPPORTED = ("logprobs", "echo", "stop", "structured_outputs", "response_format", "guided_json",
                            "guided_regex", "guided_choice", "guided_grammar", "prompt_logprobs", "logit_bias")


async def _beam_search_completion(ctx: ServerContext, body: CompletionRequest, prompts: list[Any],
                                  lora: LoRARequest | None) -> Response:
    """vLLM's `use_beam_search`: n beams per prompt (best_of beams when given), the n best returned."""
    if body.stream:
        raise InvalidRequestError("beam search does not stream: set stream to false", param="stream")
    for name in _BEAM_SEARCH_UNSUPPORTED:
        if getattr(body, name) not in (None, False):
            raise InvalidRequestError(f"{name} is not supported with use_beam_search", param=name)
    if body.temperature not in (None, 0, 0.0):
        raise InvalidRequestError("beam search is deterministic: temperature must be 0", param="temperature")
    width = body.best_of if body.best_of is not None else body.n
    if width < 1 or body.n < 1 or body.n > width:
        raise InvalidRequestError("use_beam_search needs 1 <= n <= best_of", param="n")
    params = BeamSearchParams(beam_width=width, max_tokens=16 if body.max_tokens is None else body.max_tokens,
                              ignore_eos=body.ignore_eos, length_penalty=body.length_penalty)
    request_id = new_id("cmpl")
    results = [await ctx.engine.beam_search(p, params, num_sequences=body.n, priority=body.priority,
                                            lora_request=lora) for p in prompts]
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, result in enumerate(results):
        prompt_tokens += result.sequences[0].num_prompt_tokens
        for j, seq in enumerate(result.sequences):
            completion_tokens += len(seq.output_token_ids)
            choices.append({"index": i * body.n + j, "text": seq.text, "logprobs": None,
                            "finish_reason": seq.finish_reason, "stop_reason": None})
    return JSONResponse({"id": request_id, "object": "text_completion", "created": now(),
                         "model": ctx.response_model(lora),
                         "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})
