"""`DrainingServer`: uvicorn with a graceful shutdown that drains streams too (`asyncllm serve`)."""
from __future__ import annotations

import asyncio

import uvicorn

from asyncllm.server.shutdown import GracefulShutdown


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT the app drains first (new requests get 503 while the sockets stay open;
    streams run to their end for up to `timeout` s, then end with a server_shutdown error event)
    and only then does uvicorn stop. A second signal stops it at once. uvicorn re-raises a signal
    it handled after stopping, which would end the process by that signal; a drained one is not
    re-raised, so a clean drain exits with status 0."""

    def __init__(self, config: uvicorn.Config, shutdown: GracefulShutdown, timeout: float):
        super().__init__(config)
        self.graceful = shutdown
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self.loop is None:
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        print(f"asyncllm: draining (up to {self.timeout:g}s) before stopping", flush=True)
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        assert self.loop is not None
        self._drain_task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        clean = await self.graceful.drain(self.timeout)
        print("asyncllm: drained" if clean else
              f"asyncllm: {self.graceful.streams_cut} stream(s) ended with a server_shutdown error", flush=True)
        self.should_exit = True
