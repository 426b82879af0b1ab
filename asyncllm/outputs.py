"""What the engine hands back to callers: RequestOutput and CompletionOutput."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely token
    decoded_token: str | None = None


@dataclass
class TokenLogprobs:
    """Raw logprobs at one position, as the sampler hands them on: the chosen token first, then
    the top-k (turned into `PositionLogprobs` by the output processor)."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


# One dict per position: token id -> Logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    spec_num_draft_tokens: int = 0  # speculative decoding: tokens proposed for this request, and accepted
    spec_num_accepted_tokens: int = 0


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = field(default=None, repr=False)
    exception: BaseException | None = field(default=None, repr=False)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """One embedding request's result (vLLM's shape: `output.outputs.embedding`)."""

    request_id: str
    outputs: EmbeddingOutput | None  # None until finished (and when it failed)
    prompt_token_ids: list[int]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = field(default=None, repr=False)
    exception: BaseException | None = field(default=None, repr=False)

    @property
    def prompt(self) -> None:
        return None
