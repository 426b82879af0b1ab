"""POST /v1/embeddings (OpenAI's shape), /score and /rerank (vLLM's) over an embedding engine.

Scores are the cosine similarity of the two texts' embeddings (a bi-encoder): no cross-encoder
ships offline here, and vLLM scores embedding models the same way.
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.errors import InvalidRequestError
from asyncllm.outputs import EmbeddingRequestOutput
from asyncllm.pooling_params import PoolingParams
from asyncllm.server.protocol import EmbeddingRequest, RerankRequest, ScoreRequest, now
from asyncllm.server.serving import (
    ServerContext,
    new_id,
    parse_body,
    prompt_list,
    submit_all,
    until_disconnected,
)


async def _embed(request: Request, ctx: ServerContext, engine: AsyncEngine, inputs: list[Any],
                 params: PoolingParams, priority: int) -> list[EmbeddingRequestOutput]:
    """Every input validated before any is queued; a disconnect aborts them all."""
    if len(inputs) > ctx.max_prompts_per_request:
        raise InvalidRequestError(f"at most {ctx.max_prompts_per_request} inputs per request", param="input")
    request_id = new_id("embd")
    prepared = [engine.prepare(item, params, f"{request_id}-{i}", priority) for i, item in enumerate(inputs)]
    streams = submit_all(engine, prepared)

    async def collect() -> list[EmbeddingRequestOutput]:
        finals = []
        for stream in streams:
            final = None
            async for output in stream:
                final = output
            if final is None or final.outputs is None:
                raise InvalidRequestError("an input was not embedded (aborted)", param="input")
            finals.append(final)
        return finals

    return await until_disconnected(request, collect, streams)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's client decodes it
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


async def create_embedding(request: Request, ctx: ServerContext) -> Response:
    body = await parse_body(request, EmbeddingRequest, ctx)
    engine, name = ctx.embedding_model(body.model)
    params = PoolingParams(body.dimensions, body.normalize, body.truncate_prompt_tokens)
    outputs = await _embed(request, ctx, engine, prompt_list(body.input, "input"), params, body.priority)
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return JSONResponse({
        "object": "list", "id": new_id("embd"), "created": now(), "model": name,
        "data": [{"object": "embedding", "index": i, "embedding": _encode(o.outputs.embedding, body.encoding_format)}
                 for i, o in enumerate(outputs)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def _cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))


async def create_score(request: Request, ctx: ServerContext) -> Response:
    body = await parse_body(request, ScoreRequest, ctx)
    engine, name = ctx.embedding_model(body.model)
    left = [body.text_1] if isinstance(body.text_1, str) else list(body.text_1)
    right = [body.text_2] if isinstance(body.text_2, str) else list(body.text_2)
    if not left or not right:
        raise InvalidRequestError("text_1 and text_2 must not be empty", param="text_1")
    if len(left) != 1 and len(left) != len(right):
        raise InvalidRequestError(f"text_1 has {len(left)} texts and text_2 {len(right)}: pass one text_1, or as "
                                  "many as text_2", param="text_2")
    if 2 * len(right) > ctx.max_prompts_per_request:  # a request's bound counts both texts of every pair
        raise InvalidRequestError(f"at most {ctx.max_prompts_per_request} inputs per request", param="input")
    params = PoolingParams(truncate_prompt_tokens=body.truncate_prompt_tokens)
    outputs = await _embed(request, ctx, engine, left + right, params, body.priority)  # one text_1 embedded once
    firsts, seconds = outputs[:len(left)], outputs[len(left):]
    firsts = firsts * len(right) if len(left) == 1 else firsts  # the pairs, as scored
    tokens = sum(len(o.prompt_token_ids) for o in firsts + seconds)
    return JSONResponse({
        "id": new_id("score"), "object": "list", "created": now(), "model": name,
        "data": [{"index": i, "object": "score", "score": _cosine(first.outputs.embedding,
                                                                   second.outputs.embedding)}
                 for i, (first, second) in enumerate(zip(firsts, seconds))],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def create_rerank(request: Request, ctx: ServerContext) -> Response:
    body = await parse_body(request, RerankRequest, ctx)
    engine, name = ctx.embedding_model(body.model)
    if not body.documents:
        raise InvalidRequestError("documents must not be empty", param="documents")
    params = PoolingParams(truncate_prompt_tokens=body.truncate_prompt_tokens)
    outputs = await _embed(request, ctx, engine, [body.query] + body.documents, params, body.priority)
    query = outputs[0].outputs.embedding
    results = [{"index": i, "document": {"text": text}, "relevance_score": _cosine(query, out.outputs.embedding)}
               for i, (text, out) in enumerate(zip(body.documents, outputs[1:]))]
    results.sort(key=lambda r: r["relevance_score"], reverse=True)
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return JSONResponse({"id": new_id("rerank"), "model": name, "results": results[:body.top_n or None],
                         "usage": {"total_tokens": tokens}})
