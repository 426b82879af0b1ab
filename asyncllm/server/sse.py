"""Server-sent events for the streaming endpoints, as an ASGI response of our own.

Why not sse-starlette: it ends every open stream the moment the server is asked to stop
(it hooks uvicorn's exit signal), with no `[DONE]` and no error, so clients took a cut
answer for a whole one. Here a stream ends when its events end, when its client
disconnects (its request is aborted), or when a graceful shutdown runs out of time, and
then with an error event a client can see.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from asyncllm.server.errors import APIError, to_api_error
from asyncllm.server.shutdown import GracefulShutdown

_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


def _data(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


class SSEResponse:
    """`data: <json>` per event, then `data: [DONE]`; errors mid-stream become an OpenAI error event."""

    status_code = 200

    def __init__(self, events: AsyncIterator[dict[str, Any]], shutdown: GracefulShutdown | None = None,
                 ping_s: float = 15.0):
        self.events = events
        self.shutdown = shutdown
        self.ping_s = ping_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lock = anyio.Lock()  # the pinger and the events share one connection

        async def emit(chunk: bytes) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        try:
            async with anyio.create_task_group() as tg:
                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                async def ping() -> None:
                    while True:
                        await anyio.sleep(self.ping_s)
                        await emit(b": ping\n\n")

                tg.start_soon(watch_disconnect)
                tg.start_soon(ping)
                await self._stream(emit)
                await emit(_data("[DONE]"))
                async with lock:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()  # type: ignore[attr-defined] # aborts the request if it still runs

    async def _stream(self, emit) -> None:
        scope = anyio.CancelScope()
        if self.shutdown is not None:
            self.shutdown.add_stream(scope)
        try:
            with scope:
                try:
                    async for event in self.events:
                        await emit(_data(json.dumps(event, ensure_ascii=False)))
                except Exception as exc:  # noqa: BLE001 - the headers are sent: report in-band
                    await emit(_data(json.dumps(to_api_error(exc).body())))
                    return
        finally:
            if self.shutdown is not None:
                self.shutdown.remove_stream(scope)
        if scope.cancelled_caught:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()  # type: ignore[attr-defined]
            error = APIError(503, "the server shut down before this stream finished", type_="server_shutdown",
                             code="server_shutdown")
            await emit(_data(json.dumps(error.body())))
