"""Executors: where the workers run (this thread, or one process per rank)."""
from asyncllm.executor.abstract import Executor, create_executor

__all__ = ["Executor", "create_executor"]
