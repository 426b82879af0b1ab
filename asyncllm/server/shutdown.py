"""Graceful shutdown of the API: drain in-flight requests, streams included, then stop.

`GracefulShutdown` counts the app's in-flight HTTP requests (as ASGI middleware) and knows
the cancel scope of every open SSE stream. `drain(timeout)`:
1. stops admitting: every new request gets 503 (`server_shutdown`, Retry-After);
2. waits until the in-flight requests finish, at most `timeout` seconds;
3. then ends each stream still open with an error event (`{"error": {"type":
   "server_shutdown", ...}}` then `[DONE]`), so a client can tell a cut answer from a
   whole one, and waits a moment for those last events to be written.
`asyncllm serve` runs it on SIGTERM/SIGINT before uvicorn closes its sockets (exit status
0 after a clean drain); an app that mounts the API can await `app.state.shutdown.drain()`.
"""
from __future__ import annotations

import time

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from asyncllm.server.errors import APIError

# After the deadline, how long the cut streams get to write their error events.
_FLUSH_S = 2.0


class GracefulShutdown:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._streams: set[anyio.CancelScope] = set()
        self.streams_cut = 0

    def add_stream(self, scope: anyio.CancelScope) -> None:
        self._streams.add(scope)

    def remove_stream(self, scope: anyio.CancelScope) -> None:
        self._streams.discard(scope)

    async def drain(self, timeout: float) -> bool:
        """True when every request finished by itself within `timeout` seconds."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        if not self.in_flight:
            return True
        for scope in list(self._streams):
            self.streams_cut += 1
            scope.cancel()
        flush_deadline = time.monotonic() + _FLUSH_S
        while self.in_flight and time.monotonic() < flush_deadline:
            await anyio.sleep(0.05)
        return False


class DrainMiddleware:
    """Counts in-flight HTTP requests; answers 503 to new ones while draining."""

    def __init__(self, app: ASGIApp, shutdown: GracefulShutdown):
        self.app = app
        self.shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.shutdown.draining:
            error = APIError(503, "the server is shutting down", type_="server_shutdown", code="server_shutdown",
                             headers={"Retry-After": "5", "Connection": "close"})
            await error.response()(scope, receive, send)
            return
        self.shutdown.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.shutdown.in_flight -= 1
