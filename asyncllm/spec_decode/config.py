"""SpeculativeConfig: vLLM's `speculative_config` ({"method": "ngram", "num_speculative_tokens":
4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}, or "method": "suffix" with its
suffix_decoding_* keys), validated; the proposer it asks for."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from asyncllm.json_option import dict_option

SUPPORTED_METHODS = ("ngram", "suffix", "draft_model")
DEFAULT_DISABLE_BY_BATCH_SIZE = 6
PLANNED_METHODS = ("eagle", "eagle3", "medusa", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    # No proposals while this many requests run (vLLM's key): batched steps are compute-bound,
    # where verifying rejected tokens costs more than it saves. Unset, the measured crossover
    # (`benchmarks/speculative.py --batch-sweep`, ngram k 7 on free text: 1.38x / 1.57x plain at 4
    # streams, 0.86x / 0.98x at 6, in fp32 / bf16 on a 2-vCPU EPYC); null: always propose (vLLM's default).
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE
    # A request whose recent acceptance rate (kept / proposed tokens) falls below this stops
    # proposing for a few steps, then tries again (spec_decode/acceptance.py). None (the default,
    # as vLLM has no such rule): never. Measured on free text it changed little (README).
    disable_by_acceptance_rate: float | None = None
    # method "suffix" (vLLM's keys): trie depth, finished outputs kept in the shared trie, proposal
    # length per matched token, and the least path probability worth proposing.
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    # method "draft_model" (vLLM's keys): the draft's folder or GGUF (same tokenizer as the target),
    # and its own quantization (None, int8 or int4; the target's is separate).
    model: str | None = None
    quantization: str | None = None

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
        rate = config.disable_by_acceptance_rate
        if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1):
            raise ValueError(f"speculative_config.disable_by_acceptance_rate must be in [0, 1] or null, got {rate!r}")
        if config.method == "draft_model":
            if not isinstance(config.model, str) or not config.model:
                raise ValueError("speculative_config.model (the draft model's path) is required for method "
                                 "'draft_model'")
            if config.quantization not in (None, "int8", "int4"):
                raise ValueError(f"speculative_config.quantization must be null, 'int8' or 'int4', got "
                                 f"{config.quantization!r}")
        elif config.model is not None or config.quantization is not None:
            raise ValueError(f"speculative_config.model and .quantization are for method 'draft_model', not "
                             f"{config.method!r}")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError("speculative_config.prompt_lookup_min must be <= prompt_lookup_max")
        depth, cached = config.suffix_decoding_max_tree_depth, config.suffix_decoding_max_cached_requests
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 2:
            raise ValueError(f"speculative_config.suffix_decoding_max_tree_depth must be an integer >= 2, got {depth!r}")
        if not isinstance(cached, int) or isinstance(cached, bool) or cached < 0:
            raise ValueError("speculative_config.suffix_decoding_max_cached_requests must be an integer >= 0, "
                             f"got {cached!r}")
        factor, prob = config.suffix_decoding_max_spec_factor, config.suffix_decoding_min_token_prob
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
            raise ValueError(f"speculative_config.suffix_decoding_max_spec_factor must be > 0, got {factor!r}")
        if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not 0 <= prob <= 1:
            raise ValueError(f"speculative_config.suffix_decoding_min_token_prob must be in [0, 1], got {prob!r}")
        return config


def make_proposer(config: SpeculativeConfig | None):
    if config is None:
        return None
    if config.method == "draft_model":
        from asyncllm.spec_decode.draft_model import DraftTokensProposer

        return DraftTokensProposer()
    if config.method == "suffix":
        from asyncllm.spec_decode.suffix import SuffixProposer

        return SuffixProposer(config.suffix_decoding_max_tree_depth, config.suffix_decoding_max_cached_requests,
                              config.suffix_decoding_max_spec_factor, config.suffix_decoding_min_token_prob)
    from asyncllm.spec_decode.ngram import NgramProposer

    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
