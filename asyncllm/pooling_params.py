"""PoolingParams: what an embedding request asks for (vLLM's name and fields)."""
from __future__ import annotations

from dataclasses import dataclass

from asyncllm.errors import InvalidRequestError


@dataclass
class PoolingParams:
    # Keep the first `dimensions` values (Matryoshka models), then normalise if asked.
    dimensions: int | None = None
    normalize: bool | None = None  # None: the model's default (its pooler config)
    # Cut the input to k tokens (vLLM's truncate_prompt_tokens; -1: to max_model_len, as
    # sentence-transformers does); None: a longer input is an error.
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("dimensions", "truncate_prompt_tokens"):
            value = getattr(self, name)
            smallest = -1 if name == "truncate_prompt_tokens" else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < smallest
                                      or value == 0):
                raise InvalidRequestError(f"{name} must be a positive integer"
                                          + (" (or -1: the model's max_model_len)" if smallest < 0 else ""),
                                          param=name)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidRequestError("normalize must be a boolean", param="normalize")
