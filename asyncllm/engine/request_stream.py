"""Per-request output streams, owned by the event loop that created the request.

The engine thread never touches a stream directly: it hands each loop one batch per step
through that loop's thread-safe scheduling call (asyncio's `call_soon_threadsafe`, trio's
`TrioToken.run_sync_soon`), and the batch is applied inside the loop's own thread. So a
stream is only ever touched by one thread and needs no lock. anyio events make the same
code wait under asyncio and trio.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import sniffio

from asyncllm.outputs import RequestOutput


class LoopHandle:
    """A way to run a callback inside one event loop's thread from any thread."""

    def __init__(self, key: Any, call_soon: Callable[[Callable[..., None], Any], None]):
        self.key = key  # identity of the loop (deliveries are grouped by it)
        self._call_soon = call_soon

    @classmethod
    def current(cls) -> "LoopHandle":
        library = sniffio.current_async_library()
        if library == "asyncio":
            loop = asyncio.get_running_loop()
            return cls(loop, loop.call_soon_threadsafe)
        if library == "trio":
            import trio

            token = trio.lowlevel.current_trio_token()
            return cls(token, lambda fn, arg: token.run_sync_soon(fn, arg))
        raise RuntimeError(f"unsupported async library {library!r} (asyncio and trio are supported)")

    def call_soon(self, fn: Callable[[Any], None], arg: Any) -> bool:
        """False when the loop is gone (closed): its requests have no one to deliver to."""
        try:
            self._call_soon(fn, arg)
            return True
        except RuntimeError:
            return False


class RequestStream:
    def __init__(self, request_id: str, handle: LoopHandle):
        self.request_id = request_id
        self.handle = handle
        self._items: deque[RequestOutput] = deque()
        self._error: BaseException | None = None
        self._event = anyio.Event()
        self.finished = False  # set in the loop thread when the final output or an error arrived

    # -- called inside the owning loop's thread (via LoopHandle.call_soon)
    def put(self, output: RequestOutput) -> None:
        self._items.append(output)
        if output.finished:
            self.finished = True
        self._event.set()

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.finished = True
        self._event.set()

    # -- called by the consumer (same loop)
    async def get(self) -> RequestOutput:
        while not self._items:
            if self._error is not None:
                raise self._error
            await self._event.wait()
            self._event = anyio.Event()
        return self._items.popleft()


def deliver_batch(batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """Runs inside a loop thread: hands one step's outputs to that loop's streams."""
    for stream, item in batch:
        if isinstance(item, BaseException):
            stream.fail(item)
        else:
            stream.put(item)
