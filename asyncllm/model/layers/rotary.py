"""Rotary position embedding (rotate-half layout, as transformers' Llama), with a cos/sin table."""
from __future__ import annotations

import math

import torch
from torch import nn

from asyncllm.model.arch_config import RopeConfig
from asyncllm.model.layers.ops import TORCH_OPS, Ops


def rope_inv_freq(rope: RopeConfig, head_dim: int, long: bool = False) -> torch.Tensor:
    powers = rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    inv_freq = 1.0 / powers
    if rope.rope_type == "longrope":  # transformers' _compute_longrope_parameters, short or long factors
        factors = rope.long_factor if long else rope.short_factor
        if len(factors) != head_dim // 2:
            raise ValueError(f"longrope needs {head_dim // 2} {'long' if long else 'short'} factors, got "
                             f"{len(factors)}")
        inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * powers)
    elif rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        # transformers' _compute_llama3_parameters: keep high frequencies, divide low ones by
        # `factor`, interpolate smoothly in between.
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    if rope.freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, ops: Ops = TORCH_OPS):
        super().__init__()
        self.rope, self.head_dim, self.max_positions = rope, head_dim, max_positions
        self.ops = ops
        # Non-persistent buffers: moved with .to(device) but never part of the weights.
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device) -> None:
        """(Re)computes the fp32 cos/sin tables on `device` (after a model was built on meta). With
        LongRoPE's long factors the table holds the short rows of the original context, then the long
        rows of every position: a long sequence's tokens read row `long_rope_from + position` (the
        runner shifts their positions), so every kernel indexes one table as before."""
        tables = [self._table(self.max_positions if self.rope.long_rope_from is None else self.rope.long_rope_from)]
        if self.rope.long_rope_from is not None:
            tables.append(self._table(self.max_positions, long=True))
        cos, sin = zip(*tables)
        self.cos = torch.cat(cos).to(device)
        self.sin = torch.cat(sin).to(device)

    def _table(self, rows: int, long: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_inv_freq(self.rope, self.head_dim, long)
        freqs = torch.outer(torch.arange(rows, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rope.attention_factor  # longrope's; 1 otherwise
        return emb.cos() * scale, emb.sin() * scale

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, D], k: [T, KVH, D]; positions: [T]. The kernels rotate in place."""
        rotated = self.ops.rotary(positions, q, k, self.cos, self.sin)
        if rotated is not None:
            return rotated
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
