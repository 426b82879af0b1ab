"""Attention backend on the C kernels (layers/cpu_kernels): the KV write and batched decode
attention read and write the paged cache where it lies, with no gathered copies; prompt chunks
keep the torch backend's SDPA path (one fused flash kernel per chunk already). Selected on the
CPU (kernels="auto"); dtypes the kernels lack (fp16) take the torch backend's code."""
from __future__ import annotations

import torch

from asyncllm.model.layers import cpu_kernels
from asyncllm.model.layers.attention import AttentionMetadata, TorchAttentionBackend


class CpuAttentionBackend(TorchAttentionBackend):
    def _write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if cpu_kernels.supports(k, kv_cache):
            cpu_kernels.write_kv_cache(k, v, kv_cache, slot_mapping)
        else:
            super()._write_kv(k, v, kv_cache, slot_mapping)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                nd: int, block_size: int) -> torch.Tensor:
        if not cpu_kernels.supports(q, kv_cache):
            return super()._decode(q, kv_cache, meta, nd, block_size)
        return cpu_kernels.paged_decode_attention(q, kv_cache, meta.block_tables[:nd], meta.seq_lens_tensor[:nd],
                                                  self.scale, self.sliding_window)
