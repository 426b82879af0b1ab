"""SpeculativeConfig: vLLM's `speculative_config` ({"method": "ngram", "num_speculative_tokens":
4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}), validated; the proposer it asks for."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from asyncllm.json_option import dict_option

SUPPORTED_METHODS = ("ngram",)
PLANNED_METHODS = ("suffix", "draft_model", "eagle", "eagle3", "medusa", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # No proposals while this many requests run (vLLM's key): batched steps are compute-bound,
    # where verifying rejected tokens costs more than it saves. None: always propose.
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, value: Any) -> "SpeculativeConfig | None":
        """A dict, its JSON text (the CLI's form) or None → the config; ValueError naming what is wrong."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        value = dict_option(value, "speculative_config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        method = value.get("method", "ngram")
        if method in PLANNED_METHODS:
            raise ValueError(f"speculative method {method!r} is not supported yet; supported: "
                             f"{', '.join(SUPPORTED_METHODS)}")
        if method not in SUPPORTED_METHODS:
            raise ValueError(f"unknown speculative method {method!r}; supported: {', '.join(SUPPORTED_METHODS)}")
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        config = cls(**value)
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(config, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {v!r}")
        d = config.disable_by_batch_size
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size must be an integer >= 1, got {d!r}")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must be <= prompt_lookup_max")
        return config


def make_proposer(config: SpeculativeConfig | None):
    if config is None:
        return None
    from asyncllm.spec_decode.ngram import NgramProposer

    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
