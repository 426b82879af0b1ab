"""UniProcExecutor: the one worker runs in the engine thread (no copies, today's speed)."""
from __future__ import annotations

from asyncllm.config import EngineConfig
from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.executor.abstract import Executor
from asyncllm.model.loader import Checkpoint
from asyncllm.worker.worker import CacheConfig, Worker, WorkerInfo


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint):
        self.worker = Worker(config, checkpoint)

    def initialize(self) -> WorkerInfo:
        return self.worker.load_model()

    def init_cache(self, cache: CacheConfig) -> None:
        self.worker.init_cache(cache)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute(sched)

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self.worker.shutdown()
