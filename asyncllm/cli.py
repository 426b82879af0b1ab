"""`asyncllm serve` (OpenAI-compatible server) and `asyncllm generate` (stream to the terminal).

Every engine flag is generated from the fields of EngineArgs, so the two never drift.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import time
from typing import Any

from asyncllm.config import EngineArgs
from asyncllm.tools.parsers import TOOL_PARSERS
from asyncllm.tools.reasoning import REASONING_PARSERS

_TYPES = {"int": int, "float": float, "str": str}
_SHORT_FLAGS = {"tensor_parallel_size": ["-tp"], "data_parallel_size": ["-dp"],
                "pipeline_parallel_size": ["-pp"]}  # vLLM's


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineArgs):
        if f.name == "model":
            continue
        annotation = str(f.type)
        flags = ["--" + f.name.replace("_", "-")] + _SHORT_FLAGS.get(f.name, [])
        help_text = f.metadata.get("help", "")
        if annotation == "bool":
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        base = annotation.split("|")[0].strip()
        group.add_argument(*flags, type=_TYPES.get(base, str), default=f.default, help=help_text,
                           choices=f.metadata.get("choices"), metavar=base.upper())


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    values: dict[str, Any] = {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)
                              if hasattr(ns, f.name)}
    return EngineArgs(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncllm", description="An LLM inference engine for Python web apps")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: embedded SmolLM2)")
    serve.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                       help="the model, as vLLM's --model (instead of the positional argument)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    serve.add_argument("--api-key", default=None, help="require this Bearer key (default: $ASYNCLLM_API_KEY)")
    serve.add_argument("--no-browser-page", action="store_true", help="do not serve the chat page at /")
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help="largest request body (default 4 MiB; 32 MiB for a model that takes images)")
    serve.add_argument("--max-json-depth", type=int, default=64, help="deepest JSON nesting a request body may have")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM/SIGINT: seconds in-flight requests (streams too) may run to their end "
                            "while new ones get 503; streams still open then end with a server_shutdown error "
                            "event")
    serve.add_argument("--no-openapi", action="store_true", help="do not serve /openapi.json and /docs")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='allow tool_choice "auto": tool calls read from free replies by --tool-call-parser')
    serve.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help="the tool-call format the model writes (vLLM's names)")
    serve.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="move <think>...</think> into reasoning_content")
    serve.add_argument("--embedding-model", default=None,
                       help="a second model, for /v1/embeddings, /score and /rerank (e.g. a sentence-transformers "
                            "folder), served by the same process; requests pick a model by name")
    serve.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                       help="LoRA adapters served as models of these names (needs --enable-lora)")
    serve.add_argument("--allow-runtime-lora-updating", action="store_true",
                       default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
                       help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --api-key), "
                            "loading only from under --lora-root")
    serve.add_argument("--lora-root", default=None, help="the folder runtime-loaded adapters must lie in")
    serve.add_argument("--embedding-model-name", default=None, help="its name in the API (default: its folder's)")
    add_engine_args(serve)
    # A server process owns its machine's memory: take the whole KV cache up front rather than
    # page-faulting it in during the first requests (--no-kv-cache-prefault to keep it lazy).
    # Likewise the grammar workers and json_object's automaton (--no-structured-outputs-warmup).
    serve.set_defaults(kv_cache_prefault=True, structured_outputs_warmup=True)

    gen = sub.add_parser("generate", help="stream one completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    add_engine_args(gen)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = build_parser().parse_args(argv)
    if ns.command == "serve":
        return _serve(ns)
    return _generate(ns)


def _serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from asyncllm.engine.async_engine import AsyncEngine
    from asyncllm.server.app import build_app
    from asyncllm.server.uvicorn_server import DrainingServer

    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    args = engine_args_from(ns)
    if ns.model and ns.model_flag and ns.model != ns.model_flag:
        raise SystemExit(f"asyncllm serve: two models given ({ns.model!r} and --model {ns.model_flag!r})")
    args.model = ns.model or ns.model_flag
    started = time.perf_counter()
    engine = AsyncEngine.from_args(args)
    print(f"asyncllm: loaded {engine.model_name} in {time.perf_counter() - started:.2f}s "
          f"(dtype {engine.engine.core.dtype}, max_model_len {engine.max_model_len})", flush=True)
    embedding_engine = None
    if ns.embedding_model:
        embedding_engine = AsyncEngine.from_args(EngineArgs(model=ns.embedding_model, task="embed", dtype=args.dtype,
                                                            device=args.device, kernels=args.kernels))
        print(f"asyncllm: loaded {embedding_engine.model_name} for embeddings", flush=True)
    app = build_app(engine, api_key=ns.api_key, served_model_name=args.served_model_name,
                    embedding_engine=embedding_engine, embedding_model_name=ns.embedding_model_name,
                    browser_page=not ns.no_browser_page, max_body_bytes=ns.max_body_bytes,
                    max_json_depth=ns.max_json_depth, openapi=not ns.no_openapi,
                    enable_auto_tool_choice=ns.enable_auto_tool_choice, tool_call_parser=ns.tool_call_parser,
                    reasoning_parser=ns.reasoning_parser, lora_modules=ns.lora_modules,
                    allow_runtime_lora_updating=ns.allow_runtime_lora_updating, lora_root=ns.lora_root)
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.log_level, lifespan="on")
    server = DrainingServer(config, app.state.shutdown, ns.shutdown_timeout)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"asyncllm: serving http://{ns.host}:{port} (OpenAI API at /v1, chat page at /)", flush=True)
        await task

    asyncio.run(run())
    return 0


def _generate(ns: argparse.Namespace) -> int:
    from asyncllm.engine.async_engine import AsyncEngine

    t0 = time.perf_counter()
    args = engine_args_from(ns)
    args.model = ns.model
    engine = AsyncEngine.from_args(args)
    prompt: Any = ns.prompt if ns.raw else [{"role": "user", "content": ns.prompt}]

    async def run() -> None:
        first = True
        async with engine:
            async for text in engine.stream(prompt, max_tokens=ns.max_tokens, temperature=ns.temperature):
                if first:
                    print(f"[first token after {time.perf_counter() - t0:.2f}s]", file=sys.stderr, flush=True)
                    first = False
                sys.stdout.write(text)
                sys.stdout.flush()
        sys.stdout.write("\n")

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
