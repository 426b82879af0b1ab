"""What the sampler and the logits processors read: plain data per row, never a live Request.

`SamplingRow` is the part of a request's SamplingParams a worker needs; it crosses to the
worker once, with the request. `SamplingMetadata` describes the rows of one step's logits
(a request verifying speculative tokens has several rows): their params, per-row tensors
gathered from the worker's input batch (temperature, top-k/p, min-p, penalties and the tokens
each row has seen, for the penalties), their seeded generators and the grammar bitmask rows
computed on the engine side.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingRow:
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    allowed_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    seed: int | None = None  # this sequence's own seed (None: the engine's generator)

    @classmethod
    def from_params(cls, params, eos_token_ids: Sequence[int] = (), seed: int | None = None) -> "SamplingRow":
        return cls(params.temperature, params.top_k, params.top_p, params.min_p, params.presence_penalty,
                   params.frequency_penalty, params.repetition_penalty, params.min_tokens, params.ignore_eos,
                   sorted(eos_token_ids), list(params.stop_token_ids), params.allowed_token_ids,
                   params.logit_bias, params._bad_words_token_ids, params.logprobs, params.prompt_logprobs, seed)

    @property
    def has_penalty(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


@dataclass
class PenaltyInputs:
    """What the penalties read, per logits row: the tokens seen (padded with -1) and the three
    penalties. Built only for a step where some row has a penalty."""

    prompt_token_ids: torch.Tensor  # [R, W] long: the prompt, then -1
    output_token_ids: torch.Tensor  # [R, W'] long: the outputs (and a speculative row's proposals), then -1
    presence: torch.Tensor  # [R] float32
    frequency: torch.Tensor  # [R] float32
    repetition: torch.Tensor  # [R] float32

    @classmethod
    def of(cls, params: "list[SamplingRow]", prompts: Sequence[Sequence[int]],
           outputs: Sequence[Sequence[int]]) -> "PenaltyInputs":
        return cls(pad_token_rows(prompts), pad_token_rows(outputs),
                   torch.tensor([p.presence_penalty for p in params], dtype=torch.float32),
                   torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32),
                   torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32))


def pad_token_rows(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), -1, dtype=torch.long)
    for i, tokens in enumerate(rows):
        out[i, :len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
    return out


@dataclass
class SamplingMetadata:
    """One step's sampling rows, in logits order."""

    params: list[SamplingRow]
    # Row i's outputs (plus, for a speculative row, the proposed tokens before it); called
    # only for the rows with bad words.
    output_tokens: Callable[[int], Sequence[int]]
    num_output_tokens: list[int]
    # Per row, gathered from the input batch's tensors.
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    penalties: PenaltyInputs | None = None  # None: no row has a penalty
    # Row i's own generator (seeded requests), made on first use; None for unseeded rows.
    generator: Callable[[int], torch.Generator | None] = lambda i: None
    # Rows after which the seeded generator's state is kept (a speculative row may be rejected,
    # and the stream must then resume as if it had not been drawn).
    keep_generator_state: frozenset[int] = frozenset()
    grammar_rows: list[int] = field(default_factory=list)  # logits rows under a grammar
    grammar_bitmask: torch.Tensor | None = None  # [len(grammar_rows), words] int32, bit t = token t allowed
    req_ids: list[str] = field(default_factory=list)  # each row's request

    @property
    def num_rows(self) -> int:
        return len(self.params)

    def rows_where(self, predicate: Callable[[SamplingRow], object]) -> list[int]:
        return [i for i, p in enumerate(self.params) if predicate(p)]

    @classmethod
    def of(cls, params: list[SamplingRow], prompts: list[list[int]], outputs: list[list[int]],
           generators: list[torch.Generator | None] | None = None) -> "SamplingMetadata":
        """Metadata from plain lists (tests, and callers without an input batch)."""
        gens = generators or [None] * len(params)
        penalties = PenaltyInputs.of(params, prompts, outputs) if any(p.has_penalty for p in params) else None
        return cls(params, outputs.__getitem__, [len(o) for o in outputs],
                   torch.tensor([p.temperature for p in params], dtype=torch.float32),
                   torch.tensor([p.top_k for p in params], dtype=torch.long),
                   torch.tensor([p.top_p for p in params], dtype=torch.float32),
                   torch.tensor([p.min_p for p in params], dtype=torch.float32), penalties, gens.__getitem__)
