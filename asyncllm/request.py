"""Request: the engine thread's state for one sequence being generated.

A user request with n > 1 becomes n of these ("children"), each with its own output
tokens and seed; they share prompt KV blocks through the prefix cache.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from asyncllm.lora.request import LoRARequest
from asyncllm.multimodal.inputs import ImageInput
from asyncllm.sampling.structured import GrammarState
from asyncllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int  # resolved: min(params.max_tokens, max_model_len - prompt)
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: str | None = None  # extra key of prefix-cache hashes (e.g. a tenant)
    sample_seed: int | None = None  # this sequence's seed (the worker makes its generator)
    grammar: GrammarState | None = None  # structured output automaton (None: unconstrained)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache on first schedule
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    spec_token_ids: list[int] = field(default_factory=list)  # proposed for this step, to verify
    draft_token_ids: list[int] = field(default_factory=list)  # a draft model's proposals for its next step
    pooling: bool = False  # an embedding request: finished by its pooled vector once its prompt is computed
    lora_request: LoRARequest | None = None  # its adapter (None: the base model)
    images: list[ImageInput] = field(default_factory=list)  # its prompt's images (LLaVA), by placeholder offset
    # LongRoPE (Phi-3): its K/V is computed on the long factors (it was longer than the original
    # context when it last started computing; the scheduler recomputes it when it grows past that).
    long_rope: bool = False

    @property
    def cache_key(self) -> str | None:
        """Extra key of its prefix-cache hashes: the salt and the adapter (KV differs per adapter)."""
        if self.lora_request is None:
            return self.cache_salt
        adapter = self.lora_request.cache_key
        return adapter if self.cache_salt is None else f"{self.cache_salt}|{adapter}"

    def block_key(self, start: int, end: int) -> str | None:
        """Extra key of the prefix-cache hash of its tokens [start, end): `cache_key`, and the hash of
        every image whose placeholders fall there (the same tokens with another image are other K/V;
        the hash chain carries the difference to every later block), and LongRoPE's long factors."""
        keys = [self.cache_key] if self.cache_key is not None else []
        hashes = [image.hash for image in self.images if image.overlaps(start, end)]
        if hashes:
            keys.append("image:" + ",".join(hashes))
        if self.long_rope:  # other rotary factors: other K/V for the same tokens
            keys.append("long_rope")
        return "|".join(keys) if keys else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
