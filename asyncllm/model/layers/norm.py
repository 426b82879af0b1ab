"""RMSNorm, computed exactly as transformers' LlamaRMSNorm (fp32 statistics), with the residual
add folded in (vLLM's shape: norm(x, residual) -> (normed, x + residual)), so the Triton and C
kernels can fuse the two; in fp32 the add is the same IEEE sum transformers computes."""
from __future__ import annotations

import torch
from torch import nn

from asyncllm.model.layers.ops import TORCH_OPS, Ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: Ops = TORCH_OPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: RMSNorm(x). With it: h = x + residual → (RMSNorm(h), h).
        The C kernel writes h over `residual` (the forward owns the residual stream)."""
        fused = self.ops.rms_norm(x, self.weight, self.eps, residual)
        if fused is not None:
            return fused
        h = x if residual is None else x + residual
        input_dtype = h.dtype
        x32 = h.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        normed = self.weight * x32.to(input_dtype)
        return normed if residual is None else (normed, h)
