"""MultiprocExecutor: the worker runs in its own process, one step per round trip.

The process is started as `python -m asyncllm.executor.worker_process` (never by
re-importing the caller's __main__, as multiprocessing's spawn would), connected by a
socket pair framed by multiprocessing's Connection. The engine config and each step cross
as msgpack (msgspec, typed dataclasses; no pickle). A worker that dies is noticed at once:
a pending step sees EOF, and a watcher thread (waiting on the process) tells the engine
even when it is idle. The worker exits when its parent process is gone, and on EOF.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from asyncllm.config import EngineConfig
from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.errors import EngineDeadError
from asyncllm.executor import wire
from asyncllm.executor.abstract import Executor
from asyncllm.worker.worker import CacheConfig, WorkerInfo

logger = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker raised while handling a call (its traceback is in the message)."""


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", "asyncllm.executor.worker_process",
                                         str(theirs.fileno())], pass_fds=(theirs.fileno(),))
        theirs.close()  # only the worker holds its end: its death is our EOF
        self._conn = Connection(os.dup(ours.fileno()))
        ours.close()
        self._lock = threading.Lock()  # one call on the channel at a time
        self._dead: str | None = None
        self._closing = False
        self._callbacks: list[Callable[[str], None]] = []
        self._watcher = threading.Thread(target=self._watch, name="asyncllm-worker-watch", daemon=True)
        self._watcher.start()
        self._call(b"config", wire.encode(config.args))

    @property
    def pid(self) -> int:
        return self.process.pid

    # ------------------------------------------------------------------ calls

    def initialize(self) -> WorkerInfo:
        return wire.decode(self._call(b"load"), WorkerInfo)

    def init_cache(self, cache: CacheConfig) -> None:
        self._call(b"init_cache", wire.encode(cache))

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return wire.decode(self._call(b"execute", wire.encode(sched)), ModelRunnerOutput)

    def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if self.process.poll() is not None:
            raise EngineDeadError(self._death_reason())

    def on_death(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)
        if self._dead is not None:
            callback(self._dead)

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._dead is None and self.process.poll() is None:
            try:
                with self._lock:
                    self._conn.send_bytes(b"shutdown\n")
            except OSError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # by its own pid
            self.process.wait()
        self._conn.close()

    def _call(self, method: bytes, payload: bytes = b"") -> bytes:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            try:
                self._conn.send_bytes(method + b"\n" + payload)
                reply = self._conn.recv_bytes()
            except (EOFError, OSError) as exc:
                self.process.wait(timeout=5)
                self._mark_dead(self._death_reason())
                raise EngineDeadError(self._dead) from exc
        status, _, body = reply.partition(b"\n")
        if status != b"ok":
            raise WorkerError(f"the worker process failed in {method.decode()}: {body.decode(errors='replace')}")
        return body

    # ------------------------------------------------------------------ death

    def _death_reason(self) -> str:
        code = self.process.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"the worker process (pid {self.process.pid}) {how}"

    def _watch(self) -> None:
        self.process.wait()
        if not self._closing:
            self._mark_dead(self._death_reason())

    def _mark_dead(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        logger.error("%s", reason)
        for callback in list(self._callbacks):
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - a callback's failure must not hide the death
                logger.exception("worker death callback failed")
