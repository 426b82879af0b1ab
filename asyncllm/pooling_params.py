"""PoolingParams: what an embedding request asks for (vLLM's name and fields)."""
from __future__ import annotations

from dataclasses import dataclass

from asyncllm.errors import InvalidRequestError


@dataclass
class PoolingParams:
    # Keep the first `dimensions` values (Matryoshka models), then normalise if asked.
    dimensions: int | None = None
    normalize: bool | None = None  # None: the model's default (its pooler config)
    # Keep only the last k prompt tokens (vLLM's truncate_prompt_tokens); None: a longer prompt is an error.
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("dimensions", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InvalidRequestError(f"{name} must be a positive integer", param=name)
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidRequestError("normalize must be a boolean", param="normalize")
