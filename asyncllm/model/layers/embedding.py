"""VocabParallelEmbedding: the token embedding, its vocabulary split over tensor-parallel ranks.

Each rank keeps rows [rank * V / w, (rank + 1) * V / w) (`shard_dim` 0; the tied logits read
the same slice). At world size 1, all there is today, it is nn.Embedding; the masked lookup
and all-reduce of several ranks come with tensor parallelism.
"""
from __future__ import annotations

from torch import nn

from asyncllm.model.parallel import SINGLE, ParallelContext


class VocabParallelEmbedding(nn.Embedding):
    shard_dim = 0

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext = SINGLE):
        if not parallel.is_single:
            raise NotImplementedError("a vocabulary split over several ranks comes with tensor parallelism")
        super().__init__(parallel.local_size(vocab_size, "vocabulary"), hidden_size)
        self.parallel = parallel


class ParallelLMHead(nn.Linear):
    """An untied output embedding: vocabulary rows split over the ranks like the token embedding.
    Only its weight is used (compute_logits reads it through its own packed or quantised copies)."""

    shard_dim = 0

    def __init__(self, hidden_size: int, vocab_size: int, parallel: ParallelContext = SINGLE):
        if not parallel.is_single:
            raise NotImplementedError("a vocabulary split over several ranks comes with tensor parallelism")
        super().__init__(hidden_size, parallel.local_size(vocab_size, "vocabulary"), bias=False)
        self.parallel = parallel
