"""Ops: the one choice of op implementations a model makes, at build time.

`EngineConfig.kernels` resolves to torch ops, the C kernels (CPU) or the Triton kernels
(CUDA); `Ops` is that choice as an object the layers ask: each fused op returns its result,
or None where the chosen kernels do not take these tensors (the layer then computes the
torch reference, which the kernels are tested against). No layer names a backend itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncllm.kernels import cpu as cpu_kernels

OPS_NAMES = ("torch", "cpu", "triton")


@dataclass(frozen=True)
class Ops:
    name: str = "torch"  # "torch" | "cpu" (C kernels) | "triton"

    def __post_init__(self) -> None:
        if self.name not in OPS_NAMES:
            raise ValueError(f"ops must be one of {', '.join(OPS_NAMES)}, got {self.name!r}")

    @property
    def c_kernels(self) -> bool:
        """The C kernels: panel / few-rows matmuls, 4- and 8-bit blocks, the whole-stack decode."""
        return self.name == "cpu"

    @property
    def triton(self) -> bool:
        return self.name == "triton"

    def attention_backend(self):
        from asyncllm.model.layers.attention import TorchAttentionBackend

        if self.name == "cpu":
            from asyncllm.model.layers.cpu_attention import CpuAttentionBackend

            return CpuAttentionBackend
        if self.name == "triton":
            from asyncllm.model.layers.triton_attention import TritonAttentionBackend

            return TritonAttentionBackend
        return TorchAttentionBackend

    def for_head_norms(self) -> "Ops":
        """q/k norms run over [tokens * heads, head_dim] rows: the C kernel takes them (as the
        whole-stack decode computes them), Triton's norm does not."""
        return self if self.name == "cpu" else TORCH_OPS

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
        if x.dim() != 2:
            return None
        if self.name == "triton":
            from asyncllm_kernels import rms_norm

            return rms_norm(x, weight, eps, residual)
        if self.name == "cpu" and cpu_kernels.supports(x, weight) and (residual is None or residual.is_contiguous()):
            return cpu_kernels.rms_norm(x, weight, eps, residual)
        return None

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor):
        """In place on q and k where a kernel takes them."""
        if self.name == "triton":
            from asyncllm_kernels import rotary_embedding

            return rotary_embedding(positions, q, k, cos, sin)
        if self.name == "cpu" and cpu_kernels.supports(q, k) and positions.dtype == torch.int64:
            return cpu_kernels.rotary_(positions, q, k, cos, sin)
        return None

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        if self.name == "cpu" and gate_up.dim() == 2 and cpu_kernels.supports(gate_up):
            return cpu_kernels.silu_and_mul(gate_up)  # one pass instead of three
        return None


TORCH_OPS = Ops("torch")
