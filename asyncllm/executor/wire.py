"""The executor's wire format: typed msgpack (msgspec) of the hand-off dataclasses, no pickle."""
from __future__ import annotations

import msgspec

from asyncllm.config import EngineArgs
from asyncllm.core.sched_output import ModelRunnerOutput, SchedulerOutput
from asyncllm.worker.worker import CacheConfig, WorkerInfo

_encoder = msgspec.msgpack.Encoder()
_step = msgspec.msgpack.Decoder(SchedulerOutput)
_runner_output = msgspec.msgpack.Decoder(ModelRunnerOutput)
_info = msgspec.msgpack.Decoder(WorkerInfo)
_cache = msgspec.msgpack.Decoder(CacheConfig)
_args = msgspec.msgpack.Decoder(EngineArgs)


def encode(obj) -> bytes:
    return _encoder.encode(obj)


def encode_args(args: EngineArgs) -> bytes:
    return _encoder.encode(args)


def decode_args(data: bytes) -> EngineArgs:
    return _args.decode(data)


def decode_step(data: bytes) -> SchedulerOutput:
    return _step.decode(data)


def decode_runner_output(data: bytes) -> ModelRunnerOutput:
    return _runner_output.decode(data)


def decode_info(data: bytes) -> WorkerInfo:
    return _info.decode(data)


def decode_cache(data: bytes) -> CacheConfig:
    return _cache.decode(data)
