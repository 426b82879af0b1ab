"""The executor's wire format: typed msgpack (msgspec) of the hand-off dataclasses, no pickle."""
from __future__ import annotations

from typing import TypeVar

import msgspec

from asyncllm.config import EngineArgs
from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.worker.worker import CacheConfig, WorkerInfo

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
# One decoder per type that crosses (built once; decoders are stateless).
_DECODERS = {t: msgspec.msgpack.Decoder(t)
             for t in (EngineArgs, SchedulerOutput, ModelRunnerOutput, WorkerInfo, CacheConfig)}


def encode(obj) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes, type_: type[T]) -> T:
    return _DECODERS[type_].decode(data)
