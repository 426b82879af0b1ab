"""SamplingParams: how one request is decoded, validated at construction."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from asyncllm.errors import InvalidRequestError
from asyncllm.sampling.structured import StructuredOutputs


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries all text and tokens so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass(frozen=True)
class SamplingLimits:
    """Upper bounds on request parameters; every one is an engine argument."""

    max_n: int = 16
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    max_logit_bias_entries: int = 1024
    max_bad_words: int = 256


def _err(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


@dataclass
class SamplingParams:
    n: int = 1
    # Sample this many (>= n) and return the n with the highest cumulative logprob (vLLM V0's
    # best_of); they come at the end only (no streaming), so output_kind FINAL_ONLY.
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputs | None = None
    # Filled by the engine: the token-id form of bad_words.
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise _err("logit_bias must map token ids to numbers", "logit_bias") from None
        self._validate()

    @property
    def sampling_type_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _validate(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.n) or self.n < 1:
            raise _err(f"n must be an integer >= 1, got {self.n!r}", "n")
        if self.best_of is not None:
            if not is_int(self.best_of) or self.best_of < self.n:
                raise _err(f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}", "best_of")
            if self.best_of > self.n and self.sampling_type_greedy:
                raise _err("best_of > n needs sampling (temperature > 0): greedy samples would all be the same",
                           "best_of")
        if not is_num(self.temperature) or self.temperature < 0:
            raise _err(f"temperature must be a number >= 0, got {self.temperature!r}", "temperature")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise _err(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not is_int(self.top_k) or self.top_k < 0:
            raise _err(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}", "top_k")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise _err(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_num(value) or not -2 <= value <= 2:
                raise _err(f"{name} must be in [-2, 2], got {value!r}", name)
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _err(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}", "repetition_penalty")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise _err(f"seed must be a 64-bit integer, got {self.seed!r}", "seed")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise _err(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise _err(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _err(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                raise _err(f"{name} must be an integer >= 0, got {value!r}", name)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise _err("stop must be a non-empty string or a list of non-empty strings", "stop")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise _err("stop_token_ids must be non-negative integers", "stop_token_ids")
        if self.logit_bias is not None and not all(math.isfinite(v) for v in self.logit_bias.values()):
            raise _err("logit_bias values must be finite numbers", "logit_bias")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids or not all(is_int(t) and t >= 0 for t in self.allowed_token_ids):
                raise _err("allowed_token_ids must be a non-empty list of token ids", "allowed_token_ids")
        if self.bad_words is not None and not all(isinstance(w, str) and w for w in self.bad_words):
            raise _err("bad_words must be a list of non-empty strings", "bad_words")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputs):
            raise _err("structured_outputs must be a StructuredOutputs", "structured_outputs")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise _err(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}", "output_kind")

    @property
    def num_samples(self) -> int:
        """How many sequences the engine samples: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def ranks_samples(self) -> bool:
        """More are sampled than returned: the best n by cumulative logprob are chosen at the end."""
        return self.num_samples > self.n

    def check_limits(self, limits: SamplingLimits, vocab_size: int) -> None:
        """Checks against the engine's configured bounds and the model's vocabulary."""
        if self.n > limits.max_n:
            raise _err(f"n must be <= {limits.max_n}, got {self.n}", "n")
        if self.num_samples > limits.max_n:
            raise _err(f"best_of must be <= {limits.max_n}, got {self.best_of}", "best_of")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > limits.max_logprobs:
                raise _err(f"{name} must be <= {limits.max_logprobs}, got {value}", name)
        if len(self.stop) > limits.max_stop_strings:
            raise _err(f"at most {limits.max_stop_strings} stop strings are allowed, got {len(self.stop)}", "stop")
        if any(len(s) > limits.max_stop_string_len for s in self.stop):
            raise _err(f"stop strings must be at most {limits.max_stop_string_len} characters", "stop")
        if self.logit_bias:
            if len(self.logit_bias) > limits.max_logit_bias_entries:
                raise _err(f"logit_bias may have at most {limits.max_logit_bias_entries} entries", "logit_bias")
            bad = [t for t in self.logit_bias if not 0 <= t < vocab_size]
            if bad:
                raise _err(f"logit_bias has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", "logit_bias")
        if self.allowed_token_ids is not None and any(t >= vocab_size for t in self.allowed_token_ids):
            raise _err(f"allowed_token_ids must be < vocab size {vocab_size}", "allowed_token_ids")
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise _err(f"stop_token_ids must be < vocab size {vocab_size}", "stop_token_ids")
        if self.bad_words is not None and len(self.bad_words) > limits.max_bad_words:
            raise _err(f"at most {limits.max_bad_words} bad_words are allowed", "bad_words")


_GREEDY_EPS = 1e-5
