"""Speculative decoding with a draft model (`{"method": "draft_model", "model": path}`).

The draft runs in the worker beside the target, vLLM-style. Its KV cache is paged exactly as the
target's (same block ids, same block size: one block table serves both), so it takes its share of
every block from the same memory budget and follows prefix-cache hits and preemptions for free.
Each step the draft computes the same tokens as the target (its cache stays filled), then, for
each request the scheduler asked for proposals (`ScheduledRequest.num_draft`), decodes k tokens
greedily from the token just sampled; the scheduler hands them back as the next step's
`spec_token_ids`, verified in one target forward. Greedy proposals are a point mass, so the
runner's accept-while-equal rule is exact rejection sampling: the tokens (greedy) and their
distribution (sampling) are those of the target alone.
"""
from __future__ import annotations

import torch

from asyncllm.model.layers.attention import AttentionMetadata
from asyncllm.request import Request


class DraftTokensProposer:
    """Scheduler side: the proposals are the ones the worker's draft decoded last step."""

    def propose(self, request: Request, k: int) -> list[int]:
        return request.draft_token_ids[:k]

    def finished(self, request: Request) -> None:
        pass


class DraftModel:
    """Worker side: the draft model, its paged KV cache, and k greedy decode steps per proposal."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """The step's tokens, as the target computed them: the draft's K/V for those positions."""
        self.model(input_ids, positions, self.kv_caches, meta)

    def propose(self, states: list, block_table: torch.Tensor, k: int) -> list[list[int]]:
        """For each request (its last token sampled, not yet in any cache): k greedy draft tokens,
        decoded as a batch of one-token rows (positions num_tokens - 1 ... num_tokens + k - 2, whose
        slots the scheduler allocated ahead)."""
        bs, dev, n = self.block_size, self.device, len(states)
        tokens = [state.token_ids[-1] for state in states]
        positions = [state.num_tokens - 1 for state in states]
        proposals: list[list[int]] = [[] for _ in states]
        for _ in range(k):
            slots = [state.block_ids[p // bs] * bs + p % bs for state, p in zip(states, positions)]
            seq_lens = [p + 1 for p in positions]
            meta = AttentionMetadata(num_decodes=n, query_start_loc=list(range(n + 1)), seq_lens=seq_lens,
                                     seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.long, device=dev),
                                     block_tables=block_table,
                                     slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev))
            hidden = self.model(torch.tensor(tokens, dtype=torch.long, device=dev),
                                torch.tensor(positions, dtype=torch.long, device=dev), self.kv_caches, meta)
            tokens = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
            for proposal, token in zip(proposals, tokens):
                proposal.append(token)
            positions = [p + 1 for p in positions]
        return proposals
