"""Linear layers whose weights can be pre-packed for oneDNN on the CPU.

MKL's sgemm is efficient for one row (gemv, bandwidth-bound) and for big prompt chunks, but at
the 2-64 rows of batched decoding it re-packs the weight every call: measured on this project's
CPUs, a decode-shaped layer stack took 36 ms at 8 rows against 17 ms at 1 row. oneDNN with the
weight reordered once into its blocked layout takes 25 ms at 8 rows and ~10% less at 64. One row
keeps the plain weight (gemv beats the packed path there), so packing costs a second copy of
the projection weights: `EngineArgs.cpu_weight_prepack` turns it off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PACK_HINT = 8  # rows the blocked layout is tuned for; it serves any row count (measured 1-64)


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available())


class PackedLinear:
    """The optional oneDNN-packed copy of a weight, and the matmul that uses it for >= 2 rows
    (plain F.linear for one row). Not an nn.Module: the packed tensor is a CPU-only cache of
    the weight, never a parameter, buffer or checkpoint entry."""

    def __init__(self):
        self.packed: torch.Tensor | None = None

    def pack(self, weight: torch.Tensor) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_HINT)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None or x.dim() != 2 or x.shape[0] < 2:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that uses its packed copy for multi-row inputs once `pack()` was called."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.prepacked = PackedLinear()

    def pack(self) -> None:
        self.prepacked.pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepacked.linear(x, self.weight, self.bias)
