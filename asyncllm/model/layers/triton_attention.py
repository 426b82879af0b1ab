"""Attention backend on asyncllm_kernels' Triton kernels: KV write, paged decode and varlen
prefill read the paged cache directly (no gathered copies). Selected on CUDA."""
from __future__ import annotations

import torch

from asyncllm.model.layers.attention import AttentionMetadata


class TritonAttentionBackend:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        if softcap is not None:
            raise ValueError("attention logit soft-capping (Gemma 2) is not built in the Triton kernels; "
                             "use kernels='torch'")
        import asyncllm_kernels  # fails here, at model build, when the package is missing

        self.kernels = asyncllm_kernels
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.kernels.reshape_and_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self.kernels.paged_decode_attention(q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens_tensor[:nd],
                                                self.scale, self.sliding_window, out=out[:nd])
        if nd < meta.num_requests:
            query_start, max_query_len = meta.prefill_query_starts()
            self.kernels.varlen_prefill_attention(
                q[nd:], kv_cache, meta.block_tables[nd:], query_start, meta.seq_lens_tensor[nd:], max_query_len,
                self.scale, self.sliding_window, out=out[nd:])
        return out
