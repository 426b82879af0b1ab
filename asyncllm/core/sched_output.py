"""Typed hand-offs between the scheduler, the executor's workers and the engine core.

Everything a step sends to a worker is plain data that can cross a process (msgspec
encodes these dataclasses as msgpack): a request's data once (`NewRequestData`), then only
diffs (`CachedRequestData`: new blocks, a resumption; each `ScheduledRequest` says where its
step starts), the ids that left, and the grammar bitmask the engine computed. The worker keeps
the rest in its input batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from asyncllm.lora.request import LoRARequest
from asyncllm.multimodal.inputs import ImageInput
from asyncllm.outputs import TokenLogprobs
from asyncllm.sampling.metadata import SamplingRow


@dataclass
class NewRequestData:
    """Sent once, when a request first runs on the workers."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # empty unless the engine already holds outputs
    sampling: SamplingRow
    block_ids: list[int]
    cache_key: str | None = None  # prefix-cache extra key (LoRA adapter, images, salt): for the worker's adapters
    pooling: bool = False  # an embedding request: its prompt's hidden states are pooled, nothing is sampled
    lora: LoRARequest | None = None  # its adapter: the worker loads it on first use
    images: list[ImageInput] = field(default_factory=list)  # its prompt's images (features fill placeholders)


@dataclass
class CachedRequestData:
    """A request the workers already hold, sent only when its block table changed."""

    req_id: str
    new_block_ids: list[int]
    # Back after a preemption: new_block_ids is its whole block table, and the workers re-add it
    # to the batch (its tokens and generator they kept).
    resumed: bool = False


@dataclass
class ScheduledRequest:
    req_id: str
    start: int  # tokens already in the KV cache before this step
    num_new_tokens: int  # tokens this step computes: [start, start + num_new_tokens), spec tokens included
    spec_token_ids: list[int] = field(default_factory=list)  # proposed tokens to verify (the last ones computed)
    samples: bool = True  # this step reaches the request's last known token, so it samples
    # Pipeline parallel: the request's tokens sampled since the stages before the last (which do
    # not sample) last saw it; they append them before the step.
    new_token_ids: list[int] = field(default_factory=list)
    # Draft-model speculation: after this step samples, decode this many draft tokens from the new
    # one (the next step's proposals); 0: none.
    num_draft: int = 0


@dataclass
class GrammarOutput:
    """Allowed-token bitmask of each constrained request sampling this step (engine side)."""

    req_ids: list[str]
    bitmask: bytes  # int32 [sum(num_rows) or len(req_ids), ceil(vocab / 32)], row-major
    words: int
    # Rows per request: 1, or 1 + its proposals (the mask after each accepted proposal). Empty: 1 each.
    num_rows: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # one-token queries (decodes) first
    num_batched_tokens: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # finished or aborted since the last step
    preempted_ids: list[str] = field(default_factory=list)  # the workers drop them from the batch, keep their state
    grammar: GrammarOutput | None = None
    # (source, destination) block ids: before the step, the workers copy each source block's K/V into
    # its destination (a prefix's cached partial block, continued by a request in a block of its own).
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    req_ids: list[str] = field(default_factory=list)  # the requests that sampled
    sampled_token_ids: list[list[int]] = field(default_factory=list)  # accepted spec tokens + the new one
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one entry per sampled token
    # request id → one entry per prompt position computed this step (None for the first token)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request id → error: it failed inside the worker
    pooled: dict[str, bytes] = field(default_factory=dict)  # request id → its pooled vector (fp32 bytes)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)  # request id → the draft's next proposals
    # Seconds the worker process spent on the step, from its input's bytes to this output (set
    # by the mp worker; 0 in the engine thread): the rest of a round trip is the channel's cost.
    worker_seconds: float = 0.0


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per new token
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    exception: BaseException | None = None  # the error itself, for callers that map it (e.g. to HTTP 400)
    pooled: bytes | None = None  # an embedding request's vector (fp32), with its finish
    num_draft_tokens: int = 0  # speculative decoding: tokens proposed for this step, and accepted
    num_accepted_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
