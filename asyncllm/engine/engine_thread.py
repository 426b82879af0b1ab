"""EngineThread: the one thread that owns the model, the KV cache and the scheduler.

Work arrives through one inbox (add, abort) guarded by a condition variable; the thread
sleeps on it when idle (no busy polling) and wakes on new work. After each step it sends
each event loop one batch of outputs. If the loop dies, every stream gets EngineDeadError.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from asyncllm.engine.llm_engine import LLMEngine, PreparedRequest
from asyncllm.engine.request_stream import LoopHandle, RequestStream, deliver_batch
from asyncllm.engine.stats import StatsCollector
from asyncllm.errors import (
    EngineDeadError,
    EngineOverloadedError,
    EngineShutdownError,
    InvalidRequestError,
    RequestFailedError,
)
from asyncllm.outputs import EmbeddingRequestOutput, RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    prepared: PreparedRequest
    stream: RequestStream


@dataclass
class _Abort:
    request_id: str


@dataclass
class _WorkerDied:
    reason: str


class EngineThread:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.stats = StatsCollector()
        self._inbox: deque[_Add | _Abort | _WorkerDied] = deque()
        self._cond = threading.Condition()
        self._streams: dict[str, RequestStream] = {}  # engine-thread only
        # Admission: sequences not yet running (inbox + scheduler waiting) beyond the running slots
        # still free count as waiting; those the next step will schedule do not.
        self._num_queued = 0
        self._max_num_seqs = engine.config.args.max_num_seqs
        self._free_slots = self._max_num_seqs
        self._accepting = True
        self._drain_deadline: float | None = None
        self.dead_error: EngineDeadError | None = None
        self._thread = threading.Thread(target=self._run, name="asyncllm-engine", daemon=True)
        # A worker process that dies while nothing runs must still fail every waiter at once.
        engine.core.executor.on_death(self._worker_died)

    # ------------------------------------------------------------------ caller side

    def start(self) -> None:
        with self._cond:  # two event loops may start it at the same moment
            if not self.started:
                self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def serving(self) -> bool:
        """Can it take requests: its thread and its workers are alive (or not started yet)."""
        try:
            self.engine.core.executor.check_health()
        except EngineDeadError:
            return False
        return self.dead_error is None and (self.is_alive or not self.started)

    @property
    def load(self) -> int:
        """Sequences queued or running here (what a data-parallel front balances)."""
        with self._cond:
            return self._num_queued + self._max_num_seqs - self._free_slots

    def submit(self, prepared: PreparedRequest, stream: RequestStream) -> None:
        with self._cond:
            if self.dead_error is not None:
                raise EngineDeadError(str(self.dead_error))
            if not self._accepting:
                raise EngineShutdownError("the engine is shutting down and accepts no new requests")
            waiting = self._num_queued - self._free_slots
            if waiting >= self.max_waiting_requests:
                raise EngineOverloadedError(
                    f"{waiting} requests are already waiting (max_waiting_requests="
                    f"{self.max_waiting_requests}); retry later")
            self._num_queued += len(prepared.requests)
            self._inbox.append(_Add(prepared, stream))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            if self.dead_error is None:
                self._inbox.append(_Abort(request_id))
                self._cond.notify()

    def _worker_died(self, reason: str) -> None:
        with self._cond:
            self._inbox.appendleft(_WorkerDied(reason))
            self._cond.notify()

    def shutdown(self, timeout: float | None) -> None:
        """Stops accepting; in-flight requests may finish for up to `timeout` s, the rest are aborted."""
        with self._cond:
            if self._accepting:
                self._accepting = False
                self._drain_deadline = None if timeout is None else time.monotonic() + timeout
            self._cond.notify()
        if self.started:
            self._thread.join()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while True:
                commands = self._wait_for_work()
                if commands is None:
                    break
                self._apply(commands)
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                # Recorded even without a step: aborts (or refused adds) may have emptied the engine,
                # and /metrics and stats() must not keep the old counts until the next request.
                self.stats.record_step(self.engine, outputs)
                # Recount before delivering: a caller woken by these outputs may submit at once.
                self._recount()
                self._deliver([(o.request_id, o) for o in outputs])
            self._finish_all_on_stop()
        except BaseException as exc:  # noqa: BLE001 - the engine is dead; every waiter must learn it
            logger.exception("engine thread died")
            self._die(exc)
        finally:
            self.engine.shutdown()

    def _recount(self) -> None:
        scheduler = self.engine.core.scheduler
        with self._cond:
            self._num_queued = sum(len(c.prepared.requests) for c in self._inbox_adds()) + scheduler.num_waiting
            self._free_slots = max(0, self._max_num_seqs - scheduler.num_running)

    def _inbox_adds(self) -> list[_Add]:
        return [c for c in self._inbox if isinstance(c, _Add)]

    def _wait_for_work(self) -> list[_Add | _Abort | _WorkerDied] | None:
        """Sleeps until there is work; None when shutting down and drained (or past the deadline)."""
        with self._cond:
            while True:
                busy = bool(self._inbox) or self.engine.has_unfinished_requests()
                if not self._accepting:
                    deadline = self._drain_deadline
                    if not busy or (deadline is not None and time.monotonic() >= deadline):
                        return None
                if busy:
                    commands = list(self._inbox)
                    self._inbox.clear()
                    return commands
                self._cond.wait()

    def _apply(self, commands: list[_Add | _Abort | _WorkerDied]) -> None:
        finals: list[tuple[str, RequestOutput | BaseException]] = []
        for command in commands:
            if isinstance(command, _WorkerDied):
                raise EngineDeadError(command.reason)
            if isinstance(command, _Add):
                rid = command.prepared.request_id
                try:
                    if rid in self._streams:
                        raise InvalidRequestError(f"request id {rid!r} is already in use", param="request_id")
                    self.engine.submit(command.prepared)
                except Exception as exc:  # noqa: BLE001 - fails this request only
                    self._send([(command.stream, exc)])
                    continue
                self._streams[rid] = command.stream
            else:
                finals.extend(self._abort([command.request_id]))
        self._deliver(finals)

    def _abort(self, request_ids: list[str]) -> list[tuple[str, RequestOutput]]:
        """Aborts in the engine (blocks freed now) and counts the finals in the stats."""
        finals = self.engine.abort_request(request_ids)
        self.stats.record_outputs(finals)
        return [(f.request_id, f) for f in finals]

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hands outputs (or errors) to their streams: one call per event loop per step."""
        pairs: list[tuple[RequestStream, RequestOutput | BaseException]] = []
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(item, (RequestOutput, EmbeddingRequestOutput)) and item.error is not None:
                if isinstance(item.exception, (InvalidRequestError, EngineOverloadedError)):
                    item = item.exception  # the caller's fault (a grammar that cannot compile) or busy: say so
                else:
                    item = RequestFailedError(f"request {request_id} failed in the engine: {item.error}")
            if isinstance(item, BaseException) or item.finished:
                del self._streams[request_id]
            pairs.append((stream, item))
        undelivered = self._send(pairs)
        if undelivered:
            # Their loop is closed: nobody will read these; free their KV blocks and their streams.
            orphans = [stream.request_id for stream, _ in undelivered]
            for request_id in orphans:
                self._streams.pop(request_id, None)
            self._abort(orphans)

    @staticmethod
    def _send(pairs: list[tuple[RequestStream, RequestOutput | BaseException]]) -> list[tuple[RequestStream, Any]]:
        """One call per event loop; returns the pairs whose loop is closed."""
        by_loop: dict[int, tuple[LoopHandle, list]] = {}
        for stream, item in pairs:
            by_loop.setdefault(id(stream.handle.key), (stream.handle, []))[1].append((stream, item))
        undelivered = []
        for handle, batch in by_loop.values():
            if not handle.call_soon(deliver_batch, batch):
                undelivered.extend(batch)
        return undelivered

    def _finish_all_on_stop(self) -> None:
        """Shutdown: abort whatever still runs so every iterator ends."""
        with self._cond:
            pending = self._inbox_adds()
            self._inbox.clear()
        self._send([(c.stream, EngineShutdownError("the engine shut down before this request ran")) for c in pending])
        self._deliver(self._abort(list(self._streams)))

    def _die(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(
            f"the engine thread died: {type(exc).__name__}: {exc}")
        with self._cond:
            self.dead_error = error
            pending = self._inbox_adds()
            self._inbox.clear()
        streams = list(self._streams.values()) + [c.stream for c in pending]
        self._streams.clear()
        self._send([(stream, error) for stream in streams])
