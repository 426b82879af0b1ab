"""Gemma 2 and Gemma 3 (text): the Llama-family decoder with Gemma's differences.

- four norms per layer (the attention's and the MLP's outputs are normalised before they join
  the residual stream), each scaling by 1 + w (the weight is loaded as 1 + w, so the norm
  kernels stay the Llama ones: in fp32 the same products transformers computes);
- GELU-tanh MLP, attention scaled by query_pre_attn_scalar ** -0.5;
- sliding-window layers interleaved with global ones (Gemma 3: each type with its own rope);
- Gemma 3: q/k norms; Gemma 2: attention logit soft-capping (the torch attention: the C and
  Triton kernels have no cap);
- embeddings times sqrt(hidden_size) (rounded to the weights' dtype, as transformers does),
  tied output embeddings, optional final logit soft-capping.

Projections, fusion, quantisation, LoRA and weight loading are the Llama family's; the one-call
C decoder (cpu_decode.py) is Llama-shaped, so Gemma's decode steps take the per-op kernels.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from asyncllm.model.arch_config import LlamaFamilyConfig
from asyncllm.model.interface import ModelContext
from asyncllm.model.layers.attention import AttentionMetadata
from asyncllm.model.layers.norm import RMSNorm
from asyncllm.model.layers.rotary import RotaryEmbedding
from asyncllm.model.llama import LlamaAttention, LlamaFamilyForCausalLM, LlamaMLP


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaFamilyConfig, rotary: RotaryEmbedding, ctx: ModelContext, index: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.ops)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = LlamaAttention(cfg, rotary, ctx, cfg.layer_sliding_window(index))
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = LlamaMLP(cfg, ctx)
        self.post_feedforward_layernorm = norm()

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaDecoderLayer: h is the previous layer's normalised MLP output, not yet added."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        attended = self.post_attention_layernorm(self.self_attn(x, positions, kv_cache, meta))
        x, residual = self.pre_feedforward_layernorm(attended, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaForCausalLM(LlamaFamilyForCausalLM):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (their configs say what differs)."""

    def __init__(self, cfg: LlamaFamilyConfig, ctx: ModelContext = ModelContext()):
        super().__init__(cfg, ctx)
        self.use_decode_stack = False  # the one-call C decoder has the Llama layer's shape

    def _make_layer(self, cfg: LlamaFamilyConfig, index: int) -> nn.Module:
        rotary = self.rotary
        if cfg.layer_sliding_window(index) is not None and cfg.local_rope is not None:
            if "local_rotary" not in self._modules:  # the sliding layers' rope (Gemma 3: base 10000, global 1e6)
                self.local_rotary = RotaryEmbedding(cfg.local_rope, cfg.head_dim, cfg.max_position_embeddings,
                                                    self.ctx.ops)
            rotary = self.local_rotary
        return GemmaDecoderLayer(cfg, rotary, self.ctx, index)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Gemma checkpoints store each norm's w of x * (1 + w): kept as 1 + w (added in fp32)."""
        def shifted():
            for name, tensor in weights:
                if name.endswith("norm.weight"):
                    tensor = (1.0 + tensor.float()).to(tensor.dtype)
                yield name, tensor

        super().load_weights(shifted())
