"""Attention backend on the C kernels (asyncllm/kernels/cpu): the KV write, batched decode
attention and prompt attention read and write the paged cache where it lies, with no gathered
copies and no KV heads repeated per query head (fp32 and bf16; prompt attention computes in fp32
either way, a row's result the same bits as a decode step's; bf16 prompts on AMX CPUs keep
torch's SDPA: cpu_kernels.prefill_attention_takes).
Selected on the CPU (kernels="auto"); dtypes the kernels lack (fp16) take the torch backend's
code, and so do soft-capped layers (Gemma 2: the C kernels have no cap)."""
from __future__ import annotations

import torch

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.attention import AttentionMetadata, TorchAttentionBackend


class CpuAttentionBackend(TorchAttentionBackend):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        nd = meta.num_decodes
        if nd == meta.num_requests or self.softcap is not None or not (
                q.dtype == kv_cache.dtype and cpu_kernels.supports(q) and cpu_kernels.prefill_attention_takes(q.dtype)):
            return super().forward(q, k, v, kv_cache, meta)
        self._write_kv(k, v, kv_cache, meta.slot_mapping)
        # Every prompt chunk of the step (whole prompts and chunks after cached context) in one call.
        start = meta.query_start_loc[nd]
        prompts = cpu_kernels.prefill_attention(q[start:], kv_cache, meta.block_tables[nd:],
                                                meta.prefill_query_starts()[0].long(), meta.seq_lens_tensor[nd:],
                                                self.scale, self.sliding_window)
        if not nd:
            return prompts
        return torch.cat([self._decode(q[:nd], kv_cache, meta, nd, kv_cache.shape[2]), prompts])

    def _write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if cpu_kernels.supports(k, kv_cache):
            cpu_kernels.write_kv_cache(k, v, kv_cache, slot_mapping)
        else:
            super()._write_kv(k, v, kv_cache, slot_mapping)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                nd: int, block_size: int) -> torch.Tensor:
        if self.softcap is not None or not cpu_kernels.supports(q, kv_cache):
            return super()._decode(q, kv_cache, meta, nd, block_size)
        return cpu_kernels.paged_decode_attention(q, kv_cache, meta.block_tables[:nd], meta.seq_lens_tensor[:nd],
                                                  self.scale, self.sliding_window)
