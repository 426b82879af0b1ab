"""Executor: the engine's one handle on its workers, wherever they run.

`EngineCore` creates it first: `initialize()` loads the model on every worker and reports how
many KV blocks fit; the engine decides the cache and calls `init_cache()`; then each step is
`execute(SchedulerOutput) -> ModelRunnerOutput`. `check_health()` raises EngineDeadError
once a worker is gone; `on_death` callbacks let an idle engine learn it at once.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from asyncllm.config import EngineConfig
from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.executor import wire
from asyncllm.model.loader import Checkpoint
from asyncllm.worker.worker import CacheConfig, WorkerInfo

logger = logging.getLogger(__name__)

EXECUTOR_BACKENDS = ("uni", "mp", "ray")


class Executor(ABC):
    @abstractmethod
    def initialize(self) -> WorkerInfo:
        """Loads the model on every worker → what the smallest of them holds."""

    @abstractmethod
    def init_cache(self, cache: CacheConfig) -> None:
        ...

    @abstractmethod
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        ...

    def execute_async(self, sched: SchedulerOutput) -> "PendingStep":
        """Starts the step; its result() waits for it. Steps finish in the order they started
        (pipeline parallel keeps several in flight). Here: run now."""
        return PendingStep(self.execute(sched))

    @abstractmethod
    def check_health(self) -> None:
        """Raises EngineDeadError when a worker has died."""

    @abstractmethod
    def shutdown(self) -> None:
        ...

    def on_death(self, callback: Callable[[str], None]) -> None:
        """Calls `callback(reason)` (from another thread) if a worker dies; in-process workers cannot."""


class PendingStep:
    """A started step: `result()` → its ModelRunnerOutput (waiting for it if needed)."""

    def __init__(self, output: ModelRunnerOutput | None = None,
                 wait: Callable[[], ModelRunnerOutput] | None = None):
        self._output, self._wait = output, wait

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            self._output = self._wait()
        return self._output


def smallest(infos: list[WorkerInfo]) -> WorkerInfo:
    """The ranks' load reports → the engine's: the fewest KV blocks any rank holds (pipeline stages
    with fewer layers hold more), the slowest load."""
    fewest = min(infos, key=lambda info: info.num_blocks)
    return WorkerInfo(fewest.num_blocks, fewest.dtype, max(info.load_seconds for info in infos))


class RemoteWorkersExecutor(Executor):
    """Base of the executors whose workers live elsewhere (processes, Ray actors): every call goes
    to every rank as msgpack (`_start` sends it and returns how to collect the ranks' replies, in
    order); the last rank's step output is the engine's (the last pipeline stage samples;
    tensor-parallel ranks all sample alike). The first death reason is kept (every later call
    raises EngineDeadError with it) and told once to each callback."""

    def __init__(self, config: EngineConfig) -> None:
        self._dead: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._step_timeout = config.args.execute_model_timeout

    @abstractmethod
    def _start(self, method: bytes, payload: bytes) -> Callable[[float | None], list[bytes]]:
        """Sends a call to every rank; → collect(timeout): every rank's reply body, by rank."""

    def _call(self, method: bytes, payload: bytes = b"", timeout: float | None = None) -> list[bytes]:
        return self._start(method, payload)(timeout)

    def initialize(self) -> WorkerInfo:
        return smallest([wire.decode(body, WorkerInfo) for body in self._call(b"load")])

    def init_cache(self, cache: CacheConfig) -> None:
        self._call(b"init_cache", wire.encode(cache))

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(sched).result()

    def execute_async(self, sched: SchedulerOutput) -> PendingStep:
        """Sent now; result() reads the replies (steps finish in the order they were sent)."""
        collect = self._start(b"execute", wire.encode(sched))
        return PendingStep(wait=lambda: wire.decode(collect(self._step_timeout)[-1], ModelRunnerOutput))

    def on_death(self, callback: Callable[[str], None]) -> None:
        self._callbacks.append(callback)
        if self._dead is not None:
            callback(self._dead)

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


def create_executor(config: EngineConfig, checkpoint: Checkpoint) -> Executor:
    args = config.args
    backend = args.distributed_executor_backend or (
        "mp" if max(args.tensor_parallel_size, args.pipeline_parallel_size, args.data_parallel_size) > 1 else "uni")
    if backend == "uni":
        from asyncllm.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config, checkpoint)
    if backend in ("mp", "ray"):
        from asyncllm.model.parallel import check_pipeline_parallel, check_tensor_parallel

        check_tensor_parallel(checkpoint.config, args.tensor_parallel_size)
        check_pipeline_parallel(checkpoint.config, args)
        if backend == "ray":
            from asyncllm.executor.ray_executor import RayExecutor

            return RayExecutor(config)
        from asyncllm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}; got {backend!r}")
