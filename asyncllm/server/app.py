"""build_app(engine): the OpenAI-compatible API as a Starlette app you can run or mount.

    app = FastAPI(lifespan=...)
    app.mount("/llm", build_app(engine))

Starlette does not run a mounted app's lifespan; compose `engine_lifespan(engine)` into
the parent's lifespan to start/stop the engine with the app. Without it the engine starts
on the first request (lazy start) and stops when the process exits.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import asyncllm
from asyncllm.engine.async_engine import AsyncEngine
from asyncllm.server.auth import APIKeyMiddleware
from asyncllm.server.chat import chat_prompt, create_chat_completion
from asyncllm.server.completions import create_completion
from asyncllm.server.embeddings import create_embedding, create_rerank, create_score
from asyncllm.server.errors import (
    APIError,
    api_error_handler,
    method_not_allowed_handler,
    not_found_handler,
    to_api_error,
)
from asyncllm.server.limits import BodyLimitMiddleware
from asyncllm.server.lora_adapters import LoRAModule, ServedAdapters
from asyncllm.server.metrics import ServerMetrics
from asyncllm.server.openapi import openapi_document, swagger_page
from asyncllm.server.protocol import (
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    now,
)
from asyncllm.server.serving import ServerContext, parse_body
from asyncllm.server.shutdown import DrainMiddleware, GracefulShutdown
from asyncllm.tools import get_reasoning_parser, get_tool_parser

DEFAULT_PUBLIC_PATHS = ("/health", "/metrics", "/", "/version")


@contextlib.asynccontextmanager
async def engine_lifespan(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """Starts the engine with the app and shuts it down (without blocking the loop) at exit."""
    engine.start()
    try:
        yield engine
    finally:
        await engine.ashutdown()


DEFAULT_MAX_BODY_BYTES = 4 << 20
IMAGE_MAX_BODY_BYTES = 32 << 20  # a model that takes images: a few inline photos (base64: 4/3 of their bytes)


def build_app(engine: AsyncEngine, *, api_key: str | None = None, served_model_name: str | None = None,
              public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS, browser_page: bool = True,
              max_body_bytes: int | None = None, max_prompts_per_request: int = 64, max_json_depth: int = 64,
              openapi: bool = True, run_lifespan: bool = True, enable_auto_tool_choice: bool = False,
              tool_call_parser: str | None = None, reasoning_parser: str | None = None,
              embedding_engine: AsyncEngine | None = None,
              embedding_model_name: str | None = None, lora_modules: Iterable[LoRAModule | str] = (),
              allow_runtime_lora_updating: bool = False, lora_root: str | None = None) -> Starlette:
    """The API app. `api_key` (or ASYNCLLM_API_KEY) guards every route but `public_paths`
    (/openapi.json and /docs too, unless listed there). `app.state.shutdown` drains it.
    `tool_call_parser` reads tool calls from free replies (`tool_choice="auto"`, allowed by
    `enable_auto_tool_choice`, as vLLM's flags); `reasoning_parser` moves `<think>` to reasoning_content.
    `embedding_engine` serves /v1/embeddings, /score and /rerank beside the main model (requests
    pick a model by name); without it the main model embeds (pooling its hidden states).
    `lora_modules` (`name=path`, the engine started with enable_lora) are served as models of
    those names; `allow_runtime_lora_updating` adds /v1/load_lora_adapter and
    /v1/unload_lora_adapter, which load only from under `lora_root`."""
    api_key = api_key if api_key is not None else os.environ.get("ASYNCLLM_API_KEY") or None
    names = [served_model_name] if served_model_name else []
    names += [n for n in (engine.model_name,) if n not in names]
    metrics = ServerMetrics(engine, names[0])
    shutdown = GracefulShutdown()
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if tool_call_parser is not None:
        get_tool_parser(tool_call_parser)  # an unknown name fails here, naming the choices
    if reasoning_parser is not None:
        get_reasoning_parser(reasoning_parser)
    embedding_names: tuple[str, ...] = ()
    if embedding_engine is not None:
        embedding_names = tuple(dict.fromkeys(n for n in (embedding_model_name, embedding_engine.model_name) if n))
        if set(embedding_names) & set(names):
            raise ValueError(f"the embedding model needs a name of its own (both are {embedding_names[0]!r}): "
                             "pass embedding_model_name")
    modules = [m if isinstance(m, LoRAModule) else LoRAModule.parse(m) for m in lora_modules]
    adapters = None
    if modules or allow_runtime_lora_updating:
        taken = [m.name for m in modules if m.name in names or m.name in embedding_names]
        if taken:
            raise ValueError(f"--lora-modules: the name {taken[0]!r} is the served model's")
        adapters = ServedAdapters(engine, names[0], modules, allow_runtime_lora_updating, lora_root)
    ctx = ServerContext(engine, names, metrics, shutdown, max_prompts_per_request, max_json_depth,
                        tool_call_parser if enable_auto_tool_choice else None, reasoning_parser,
                        embedding_engine, embedding_names, adapters)

    def endpoint(name: str, handler):
        async def wrapped(request: Request) -> Response:
            status = 500
            try:
                response = await handler(request, ctx)
                status = response.status_code
                return response
            except Exception as exc:
                error = to_api_error(exc)
                status = error.status
                return error.response()
            finally:
                metrics.count(name, status)

        return wrapped

    async def health(request: Request, ctx: ServerContext) -> Response:
        if engine.is_healthy and (embedding_engine is None or embedding_engine.is_healthy):
            return JSONResponse({"status": "ok"})
        raise APIError(503, "the engine is not healthy", type_="service_unavailable", code="engine_dead")

    async def version(request: Request, ctx: ServerContext) -> Response:
        return JSONResponse({"version": asyncllm.__version__})

    async def models(request: Request, ctx: ServerContext) -> Response:
        served = [(name, engine) for name in ctx.model_names]
        served += [(name, embedding_engine) for name in ctx.embedding_names]
        data = [{"id": name, "object": "model", "created": now(), "owned_by": "asyncllm", "root": name,
                 "parent": None, "max_model_len": model.max_model_len, "task": model.engine.task}
                for name, model in served]
        # Adapters as vLLM lists them: their folder as root, the base model as parent.
        data += [{"id": lora.lora_name, "object": "model", "created": now(), "owned_by": "asyncllm",
                  "root": lora.lora_path, "parent": lora.base_model_name, "max_model_len": engine.max_model_len,
                  "task": engine.engine.task} for lora in (ctx.adapters.served() if ctx.adapters else [])]
        return JSONResponse({"object": "list", "data": data})

    async def load_lora_adapter(request: Request, ctx: ServerContext) -> Response:
        body = await parse_body(request, LoadLoRAAdapterRequest, ctx)
        lora = await ctx.adapters.load(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")  # vLLM's reply

    async def unload_lora_adapter(request: Request, ctx: ServerContext) -> Response:
        body = await parse_body(request, UnloadLoRAAdapterRequest, ctx)
        lora = ctx.adapters.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.")

    async def tokenize(request: Request, ctx: ServerContext) -> Response:
        body = await parse_body(request, TokenizeRequest, ctx)
        ctx.check_model(body.model, generation=False)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "pass exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            tokens = chat_prompt(ctx, body.messages, body.add_generation_prompt, None)["prompt_token_ids"]
        else:
            tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len})

    async def detokenize(request: Request, ctx: ServerContext) -> Response:
        body = await parse_body(request, DetokenizeRequest, ctx)
        ctx.check_model(body.model, generation=False)
        vocab = engine.engine.core.checkpoint.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens must be in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})

    async def page(request: Request, ctx: ServerContext) -> Response:
        html = resources.files("asyncllm.server").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", ctx.model_name))

    async def openapi_json(request: Request, ctx: ServerContext) -> Response:
        return JSONResponse(openapi_document("asyncllm", asyncllm.__version__, browser_page))

    async def docs(request: Request, ctx: ServerContext) -> Response:
        return HTMLResponse(swagger_page(request.scope.get("root_path", "") + "/openapi.json"))

    routes = [
        Route("/health", endpoint("health", health), methods=["GET"]),
        Route("/version", endpoint("version", version), methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/v1/models", endpoint("models", models), methods=["GET"]),
        Route("/v1/completions", endpoint("completions", create_completion), methods=["POST"]),
        Route("/v1/chat/completions", endpoint("chat", create_chat_completion), methods=["POST"]),
        Route("/v1/embeddings", endpoint("embeddings", create_embedding), methods=["POST"]),
        *(Route(path, endpoint("score", create_score), methods=["POST"]) for path in ("/score", "/v1/score")),
        *(Route(path, endpoint("rerank", create_rerank), methods=["POST"])
          for path in ("/rerank", "/v1/rerank", "/v2/rerank")),
        Route("/tokenize", endpoint("tokenize", tokenize), methods=["POST"]),
        Route("/detokenize", endpoint("detokenize", detokenize), methods=["POST"]),
    ]
    if allow_runtime_lora_updating:  # absent otherwise: a 404, as in vLLM without the switch
        routes += [Route("/v1/load_lora_adapter", endpoint("load_lora_adapter", load_lora_adapter), methods=["POST"]),
                   Route("/v1/unload_lora_adapter", endpoint("unload_lora_adapter", unload_lora_adapter),
                         methods=["POST"])]
    if browser_page:
        routes.append(Route("/", endpoint("page", page), methods=["GET"]))
    if openapi:
        routes += [Route("/openapi.json", endpoint("openapi", openapi_json), methods=["GET"]),
                   Route("/docs", endpoint("docs", docs), methods=["GET"])]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(engine_lifespan(engine))
            if embedding_engine is not None:
                await stack.enter_async_context(engine_lifespan(embedding_engine))
            yield

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found_handler, 405: method_not_allowed_handler, HTTPException: api_error_handler},
        lifespan=lifespan if run_lifespan else None,
    )
    if max_body_bytes is None:  # images come inline (data: URLs): a model that takes them gets room for a few
        max_body_bytes = IMAGE_MAX_BODY_BYTES if engine.engine.takes_images else DEFAULT_MAX_BODY_BYTES
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, public_paths=public_paths)
    app.add_middleware(DrainMiddleware, shutdown=shutdown)  # outermost: counts every request
    app.state.engine = engine
    app.state.embedding_engine = embedding_engine
    app.state.context = ctx
    app.state.shutdown = shutdown
    return app
