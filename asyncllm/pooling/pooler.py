"""The worker side of pooling: a request's hidden states → one fp32 vector, across prompt chunks.

A decoder's prompt may be split over several steps (chunked prefill), so MEAN keeps a running
sum and CLS the first row until the last chunk, when the vector is handed back. Encoders see
each whole prompt in one step. Normalising and Matryoshka truncation are per request and
happen in the engine (output processor), on the vector this returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PoolingState:
    """What a pooling request has gathered so far (reset when it is preempted and recomputed)."""

    total: torch.Tensor | None = None  # MEAN: fp32 sum of the rows seen
    first: torch.Tensor | None = None  # CLS: the first prompt row

    def reset(self) -> None:
        self.total = self.first = None


class Pooler:
    def __init__(self, pooling_type: str):
        self.pooling_type = pooling_type

    def add_chunk(self, state: PoolingState, rows: torch.Tensor, start: int) -> None:
        """Takes this step's hidden rows of the request, whose first is prompt position `start`."""
        if self.pooling_type == "MEAN":
            chunk = rows.float().sum(0)
            state.total = chunk if state.total is None or start == 0 else state.total + chunk
        elif self.pooling_type == "CLS" and start == 0:
            state.first = rows[0].float()

    def finish(self, state: PoolingState, rows: torch.Tensor, num_prompt_tokens: int) -> bytes:
        """The pooled vector once the last chunk was added, as fp32 bytes (crosses processes as is)."""
        if self.pooling_type == "LAST":
            vector = rows[-1].float()
        elif self.pooling_type == "MEAN":
            vector = state.total / num_prompt_tokens
        else:
            vector = state.first
        state.reset()
        return vector.contiguous().cpu().numpy().tobytes()
