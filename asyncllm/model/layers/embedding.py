"""VocabParallelEmbedding: the token embedding, its vocabulary split over tensor-parallel ranks.

Each rank keeps rows [rank * V / w, (rank + 1) * V / w) (`shard_dim` 0; the tied logits read
the same slice, and compute_logits gathers the ranks' columns). At world size 1 it is
nn.Embedding; over several ranks each looks up the ids in its slice, zeros the others' rows and
the ranks' rows are summed (one all-reduce).
"""
from __future__ import annotations

import torch
from torch import nn

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.parallel import SINGLE, ParallelContext


def uninitialised_embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its random init, which the checkpoint overwrites: on the meta device
    that init (normal_) imports torch._dynamo and triton, ~140 MB of RSS a CPU engine never uses."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class VocabParallelEmbedding(nn.Embedding):
    shard_dim = 0

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext = SINGLE):
        rows = parallel.local_size(vocab_size, "vocabulary")
        super().__init__(rows, hidden_size, _weight=torch.empty(rows, hidden_size))
        self.parallel = parallel
        # quantized_weights_only: the rows as Q8_0 blocks instead of the dense weight (one rank),
        # each looked-up row unpacked as it is read (keep_only_blocks).
        self.blocks = None
        # Tied logits on panels that serve every step: the rows read from that panel copy instead
        # of a second copy of the same values (read_rows_from_panels).
        self.panels: torch.Tensor | None = None

    def keep_only_blocks(self, blocks) -> int:
        """Looks rows up in `blocks` (a BlockQuantWeight of this weight) and frees the dense weight. → bytes freed."""
        freed = self._free_weight("kept as blocks")
        self.blocks = blocks
        return freed

    def read_rows_from_panels(self, panels: torch.Tensor) -> int:
        """Looks rows up in the tied logits' panel copy of this weight (cpu_kernels.pack_panels'
        layout: row r is column r % width of panel r // width) and frees the dense weight: the same
        values, held once (113 MB in fp32 for the default model). One rank. → bytes freed."""
        freed = self._free_weight("read from panels")
        self.panels = panels
        return freed

    def _free_weight(self, instead: str) -> int:
        """Frees the dense weight of one rank's whole embedding, read from another copy. → bytes freed."""
        if not self.parallel.is_single:
            raise ValueError(f"an embedding {instead} is not supported over several ranks")
        freed = self.weight.numel() * self.weight.element_size()
        self.weight = nn.Parameter(torch.empty(0, self.embedding_dim, dtype=self.weight.dtype), requires_grad=False)
        return freed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:
            return self.blocks.take(ids).to(self.weight.dtype)
        if self.panels is not None:
            return cpu_kernels.panel_rows(self.panels, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        if self.parallel.is_single:
            return super().forward(ids)
        first = self.parallel.rank * self.num_embeddings
        local = ids - first
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = super().forward(local.masked_fill(outside, 0))
        rows.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.parallel.all_reduce(rows)


class ParallelLMHead(nn.Linear):
    """An untied output embedding: vocabulary rows split over the ranks like the token embedding.
    Only its weight is used (compute_logits reads it through its own packed or quantised copies)."""

    shard_dim = 0

    def __init__(self, hidden_size: int, vocab_size: int, parallel: ParallelContext = SINGLE):
        super().__init__(hidden_size, parallel.local_size(vocab_size, "vocabulary"), bias=False)
        self.parallel = parallel

    def free_weight(self) -> int:
        """Frees the weight once the logits are read from another copy of it (blocks or panels). → bytes freed."""
        freed = self.weight.numel() * self.weight.element_size()
        empty = torch.empty(0, self.in_features, dtype=self.weight.dtype)
        self.weight = nn.Parameter(empty, requires_grad=False)
        return freed
