"""Executor: the engine's one handle on its workers, wherever they run.

`EngineCore` creates it first: `initialize()` loads the model on every worker and reports how
many KV blocks fit; the engine decides the cache and calls `init_cache()`; then each step is
`execute(SchedulerOutput) -> ModelRunnerOutput`. `check_health()` raises EngineDeadError
once a worker is gone; `on_death` callbacks let an idle engine learn it at once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from asyncllm.config import EngineConfig
from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.model.loader import Checkpoint
from asyncllm.worker.worker import CacheConfig, WorkerInfo

EXECUTOR_BACKENDS = ("uni", "mp")


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

    @abstractmethod
    def check_health(self) -> None:
        """Raises EngineDeadError when a worker has died."""

    @abstractmethod
    def shutdown(self) -> None:
        ...

    def on_death(self, callback: Callable[[str], None]) -> None:
        """Calls `callback(reason)` (from another thread) if a worker dies; in-process workers cannot."""


def create_executor(config: EngineConfig, checkpoint: Checkpoint) -> Executor:
    backend = config.args.distributed_executor_backend or ("mp" if config.args.tensor_parallel_size > 1 else "uni")
    if backend == "uni":
        from asyncllm.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config, checkpoint)
    if backend == "mp":
        from asyncllm.executor.multiproc import MultiprocExecutor
        from asyncllm.model.parallel import check_tensor_parallel

        check_tensor_parallel(checkpoint.config, config.args.tensor_parallel_size)

        return MultiprocExecutor(config)
    raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)} "
                     f"(ray comes with distributed inference); got {backend!r}")
