"""Batch-level logits processors: each sees the whole batch's logits and edits them in place.

A processor only touches the rows whose requests asked for it, with one vectorised
operation where it can; a batch that asks for nothing pays one cheap check. They read
`SamplingMetadata` (plain data per row), so they run the same in a worker process. Structured
output is the last one: it applies the grammar bitmask the engine computed for the step.
"""
from __future__ import annotations

from typing import Protocol

import torch

from asyncllm.sampling.metadata import SamplingMetadata

NEG_INF = float("-inf")


class LogitsProcessor(Protocol):
    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        ...


class AllowedTokensProcessor:
    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        for row in meta.rows_where(lambda p: p.allowed_token_ids is not None):
            allowed = torch.tensor(meta.params[row].allowed_token_ids, device=logits.device)
            keep = logits[row, allowed].clone()
            logits[row] = NEG_INF
            logits[row, allowed] = keep


class LogitBiasProcessor:
    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        rows, cols, vals = [], [], []
        for i, p in enumerate(meta.params):
            for token, bias in (p.logit_bias or {}).items():
                rows.append(i)
                cols.append(token)
                vals.append(bias)
        if rows:
            logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                              torch.tensor(vals, dtype=logits.dtype, device=logits.device), accumulate=True)


class MinTokensProcessor:
    """Before min_tokens outputs, EOS and stop tokens cannot be sampled."""

    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        rows, cols = [], []
        for i, p in enumerate(meta.params):
            if meta.num_output_tokens[i] < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(p.eos_token_ids))
                rows.extend([i] * len(banned))
                cols.extend(banned)
        if rows:
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = NEG_INF


class BadWordsProcessor:
    """A bad word's last token is banned wherever the tokens before it were just generated."""

    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        for row in meta.rows_where(lambda p: p.bad_words_token_ids):
            out = meta.output_tokens(row)
            for word in meta.params[row].bad_words_token_ids:
                prefix = word[:-1]
                if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix):] == prefix):
                    logits[row, word[-1]] = NEG_INF


class PenaltiesProcessor:
    """Presence/frequency penalties (OpenAI) on output tokens, repetition penalty on prompt + output.
    Reads the metadata's penalty tensors: one scatter counts every penalised row's tokens."""

    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> None:
        inputs = meta.penalties
        if inputs is None:
            return
        rows = torch.tensor(meta.rows_where(lambda p: p.has_penalty), dtype=torch.long)
        vocab = logits.shape[1]
        device = logits.device
        counts = _token_counts(inputs.output_token_ids[rows], vocab, device)  # [R, V]
        sub = logits[rows.to(device)]
        rep = inputs.repetition[rows].to(device)[:, None]
        if (rep != 1.0).any():
            seen = (_token_counts(inputs.prompt_token_ids[rows], vocab, device) > 0) | (counts > 0)
            penalised = torch.where(sub > 0, sub / rep, sub * rep)
            sub = torch.where(seen, penalised, sub)
        freq = inputs.frequency[rows].to(device)[:, None]
        pres = inputs.presence[rows].to(device)[:, None]
        sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        logits[rows.to(device)] = sub


def _token_counts(tokens: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """[R, W] token ids padded with -1 → [R, vocab] counts (the pads land in a dropped column)."""
    index = torch.where(tokens < 0, vocab, tokens).to(device)
    counts = torch.zeros(tokens.shape[0], vocab + 1, device=device)
    counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab]


def _structured():
    from asyncllm.sampling.structured import StructuredOutputProcessor

    return StructuredOutputProcessor()


DEFAULT_PROCESSORS: tuple = (
    AllowedTokensProcessor,
    LogitBiasProcessor,
    BadWordsProcessor,
    MinTokensProcessor,
    PenaltiesProcessor,
    _structured,  # last: nothing may re-enable a token the structure forbids
)
