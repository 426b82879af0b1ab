"""Sampler: logits of the batch's sampling rows → one token per row, plus logprobs.

Vectorised over the batch: temperature, top-k, top-p and min-p are tensor ops over all
rows at once; random choice uses the exponential-race trick (argmax of p / q with
q ~ Exp(1)), which is exact sampling from p. Rows with their own seed draw q from their
own generator, so a seeded request gives the same text whatever else is in the batch.
Logprobs are those of the raw model output (before penalties and temperature).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncllm.outputs import TokenLogprobs
from asyncllm.sampling.logits_processors import DEFAULT_PROCESSORS, LogitsProcessor, SamplingBatch

_GREEDY_EPS = 1e-5


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int, device: torch.device, processors: list[LogitsProcessor] | None = None):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.processors = list(processors) if processors is not None else [cls() for cls in DEFAULT_PROCESSORS]

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        params = [r.sampling_params for r in batch.requests]
        want_logprobs = [p.logprobs for p in params]
        raw_logprobs = None
        if any(k is not None for k in want_logprobs):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        for processor in self.processors:
            processor.apply(logits, batch)

        temps = [p.temperature for p in params]
        greedy = [t < _GREEDY_EPS for t in temps]
        # max(dim).indices is argmax (first index on ties and NaN, checked) at 2.5x its speed on the
        # CPU: 0.8 vs 2.0 ms for 64 x 49k logits.
        argmax = logits.max(dim=-1).indices
        if all(greedy):
            tokens = argmax
        else:
            tokens = self._random(logits, batch, temps, greedy, argmax)

        token_list = tokens.tolist()  # the one host sync of sampling
        out_logprobs: list[TokenLogprobs | None] = [None] * len(token_list)
        if raw_logprobs is not None:
            out_logprobs = _gather_logprobs(raw_logprobs, token_list, want_logprobs)
        return SamplerOutput(token_list, out_logprobs)

    def _random(self, logits: torch.Tensor, batch: SamplingBatch, temps: list[float], greedy: list[bool],
                argmax: torch.Tensor) -> torch.Tensor:
        device = logits.device
        params = [r.sampling_params for r in batch.requests]
        temp = torch.tensor([1.0 if g else t for g, t in zip(greedy, temps)], device=device)
        scaled = logits / temp[:, None]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled = _apply_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        if any(m > 0 for m in min_p):
            m = torch.tensor(min_p, device=device)[:, None]
            probs = torch.where(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        q = torch.empty_like(probs)
        q.exponential_(generator=self.generator)
        for i, request in enumerate(batch.requests):
            if request.sample_seed is not None and not greedy[i]:
                if request.generator is None:
                    request.generator = torch.Generator(device=device)
                    request.generator.manual_seed(request.sample_seed)
                q[i].exponential_(generator=request.generator)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(torch.tensor(greedy, device=device), argmax, sampled)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
    k = k.clamp(max=vocab)
    positions = torch.arange(vocab, device=logits.device)[None, :]
    remove = positions >= k[:, None]
    p = torch.tensor(top_p, device=logits.device)[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    cum_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    remove |= cum_before > p  # keep the smallest prefix whose mass reaches top_p (always ≥ 1 token)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def _gather_logprobs(raw: torch.Tensor, tokens: list[int], want: list[int | None]) -> list[TokenLogprobs | None]:
    rows = [i for i, k in enumerate(want) if k is not None]
    k_max = max(want[i] for i in rows)
    sub = raw[rows]
    chosen_ids = torch.tensor([tokens[i] for i in rows], device=raw.device)
    chosen = sub.gather(1, chosen_ids[:, None])
    ranks = (sub > chosen).sum(dim=-1) + 1
    top_vals, top_ids = (sub.topk(k_max, dim=-1) if k_max > 0 else (sub[:, :0], sub[:, :0].long()))
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    out: list[TokenLogprobs | None] = [None] * len(tokens)
    for j, i in enumerate(rows):
        k = want[i]
        out[i] = TokenLogprobs(
            token_ids=[tokens[i]] + top_ids_l[j][:k],
            logprobs=[chosen_l[j]] + top_vals_l[j][:k],
            ranks=[ranks_l[j]] + list(range(1, k + 1)),
        )
    return out


def prompt_logprobs_for(raw_logits: torch.Tensor, next_tokens: list[int], k: int) -> list[TokenLogprobs]:
    """Logprobs of each known next token at prompt positions (one row per position)."""
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
    return _gather_logprobs(logprobs, next_tokens, [k] * len(next_tokens))  # type: ignore[return-value]
