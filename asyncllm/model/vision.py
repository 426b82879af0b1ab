"""The vision side of a LLaVA-style model: a CLIP or SigLIP vision transformer and the projector.

Images run once per request (the worker caches their features, model_runner.py), a whole
batch of same-size images at a time, in the model's dtype, with plain torch ops in
transformers' order (so fp32 features equal its). Only the layers up to the deepest feature
layer are built and run; the tower's post-norm and pooling head are never used by LLaVA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.model.layers.embedding import uninitialised_embedding
from asyncllm.model.vision_config import VisionConfig


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu  # "gelu": the exact (erf) form


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, rows, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             scale=self.head_dim ** -0.5)  # bidirectional: every patch sees all
        return self.out_proj(out.transpose(1, 2).reshape(batch, rows, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not cfg.has_class_token)  # CLIP's conv has no bias, SigLIP's has
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size)) if cfg.has_class_token else None
        self.position_embedding = uninitialised_embedding(cfg.num_patches + (1 if cfg.has_class_token else 0),
                                                          cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionTower(nn.Module):
    """The vision transformer → the hidden states at the feature layers, concatenated."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
                             if cfg.has_class_token else None)  # (sic: CLIP's name)
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.layers_to_run))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1]))
        features = [states[k] for k in self.cfg.feature_layers]
        if self.cfg.has_class_token and self.cfg.select_strategy == "default":
            features = [f[:, 1:] for f in features]
        return torch.cat(features, dim=-1)


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.hidden_size * len(cfg.feature_layers), text_hidden_size, bias=cfg.projector_bias)
        self.act = activation(cfg.projector_act)
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size, bias=cfg.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def tower_name(checkpoint_name: str) -> str | None:
    """A checkpoint's vision-tower tensor name → ours (None: not needed: the post-norm, the pooling
    head, or a layer past the deepest feature layer, filtered by the caller)."""
    name = checkpoint_name.removeprefix("vision_model.")
    if name.startswith(("post_layernorm.", "head.")):
        return None
    return name.replace("encoder.layers.", "layers.", 1)
