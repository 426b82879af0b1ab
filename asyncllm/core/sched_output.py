"""Typed hand-offs between the scheduler, the model runner and the engine core."""
from __future__ import annotations

from dataclasses import dataclass, field

from asyncllm.outputs import TokenLogprobs
from asyncllm.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # tokens already in the KV cache before this step
    num_new_tokens: int  # tokens this step computes: [start, start + num_new_tokens)
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """True when this step finishes the request's known tokens, so it samples the next one."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # one-token queries (decodes) first
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int]  # request id → sampled token
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id → one entry per prompt position computed this step (None for the first token)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    exception: BaseException | None = None  # the error itself, for callers that map it (e.g. to HTTP 400)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
