"""A FastAPI app with its own routes, the engine's OpenAI API mounted at /llm, and an SSE route of its own.

Run:  python examples/fastapi_mount.py   (then open http://127.0.0.1:8000/llm/ for the chat page)
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

from fastapi import FastAPI
from sse_starlette.sse import EventSourceResponse

from asyncllm import AsyncEngine
from asyncllm.server import build_app, engine_lifespan


def create_app(engine: AsyncEngine, use_lifespan: bool = True) -> FastAPI:
    # Starlette does not run a mounted app's lifespan: compose the engine's into ours.
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with engine_lifespan(engine):
            yield

    app = FastAPI(title="my app", lifespan=lifespan if use_lifespan else None)

    @app.get("/hello")
    async def hello() -> dict:
        return {"message": "my own route"}

    @app.get("/joke")
    async def joke(topic: str = "cats") -> EventSourceResponse:
        """Our own SSE endpoint, streaming straight from the engine (no HTTP hop)."""

        async def events():
            async for text in engine.stream([{"role": "user", "content": f"Tell a short joke about {topic}."}],
                                            max_tokens=48, temperature=0):
                yield json.dumps({"text": text})
            yield "[DONE]"

        return EventSourceResponse(events())

    app.mount("/llm", build_app(engine, run_lifespan=False))
    return app


if __name__ == "__main__":
    import uvicorn

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    uvicorn.run(create_app(AsyncEngine.from_args()), host="127.0.0.1", port=port)
