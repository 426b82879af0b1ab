"""BERT-style encoders (`BertModel`: all-MiniLM, BGE, E5, GTE-base...) for embeddings.

Every request's whole prompt is in one step (the engine turns chunked prefill off for
encoders), so attention is bidirectional within each sequence and nothing is cached: the
KV cache list is empty. The projections run over the step's packed tokens (no padding);
only attention pads, to the longest sequence of the step, with a key mask. They are plain
torch linears: at an encoder step's thousands of rows MKL's sgemm beat both the C panel GEMM
and oneDNN's packed weights here (64 x 128 tokens, MiniLM: 1.37 s vs 1.57 s and 1.49 s).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from asyncllm.model.arch_config import EncoderConfig
from asyncllm.model.interface import ModelContext, copy_checked
from asyncllm.model.layers.embedding import uninitialised_embedding


class BertLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(h, 3 * h)  # query, key, value fused at load
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.out = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.gelu_approximate = "none" if cfg.hidden_act == "gelu" else "tanh"

    def forward(self, h: torch.Tensor, padding: "_Padding") -> torch.Tensor:
        t = h.shape[0]
        q, k, v = self.qkv(h).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        attn = padding.attention(q, k, v).reshape(t, -1)
        h = self.attn_norm(h + self.attn_out(attn))
        inner = F.gelu(self.intermediate(h), approximate=self.gelu_approximate)
        return self.out_norm(h + self.out(inner))


class _Padding:
    """One step's sequences as a padded [B, heads, L, D] batch for attention (built once per
    forward, shared by the layers): where each flat token goes, and which keys are real."""

    def __init__(self, query_start: list[int], device: torch.device):
        lengths = [b - a for a, b in zip(query_start, query_start[1:])]
        self.num_tokens = query_start[-1]
        self.uniform = len(set(lengths)) == 1
        self.batch, self.max_len = len(lengths), max(lengths)
        if not self.uniform:
            starts = torch.tensor(query_start[:-1], device=device)
            offsets = torch.arange(self.max_len, device=device)
            lens = torch.tensor(lengths, device=device)
            self.valid = offsets[None, :] < lens[:, None]  # [B, L]
            # Padded slots read the zero row appended past the last token.
            self.gather = torch.where(self.valid, starts[:, None] + offsets[None, :], self.num_tokens)
            self.key_mask = self.valid[:, None, None, :]  # [B, 1, 1, L]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [T, heads, D] → [T, heads, D], each sequence attending to itself only."""
        if self.uniform:
            shape = (self.batch, self.max_len) + q.shape[1:]
            out = F.scaled_dot_product_attention(*(x.view(shape).transpose(1, 2) for x in (q, k, v)))
            return out.transpose(1, 2).reshape(q.shape)

        def pad(x: torch.Tensor) -> torch.Tensor:
            padded = torch.cat([x, x.new_zeros((1,) + x.shape[1:])])[self.gather]  # [B, L, heads, D]
            return padded.transpose(1, 2)

        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=self.key_mask)
        return out.transpose(1, 2)[self.valid]


class BertEncoder(nn.Module):
    pooler = None  # pooling is the runner's (pooling/pooler.py), as the folder's config says

    def __init__(self, cfg: EncoderConfig, ctx: ModelContext = ModelContext()):
        super().__init__()
        if not ctx.parallel.is_single:
            raise NotImplementedError("encoder models run on one rank")
        self.config = cfg
        self.ctx = ctx
        h = cfg.hidden_size
        self.word_embeddings = uninitialised_embedding(cfg.vocab_size, h)
        self.position_embeddings = uninitialised_embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = uninitialised_embedding(cfg.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta) -> torch.Tensor:
        """→ the last layer's hidden states [T, hidden] (segment 0 for every token)."""
        h = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        h = self.embed_norm(h)
        padding = _Padding(meta.query_start_loc, h.device)
        for layer in self.layers:
            h = layer(h, padding)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an encoder has no language-model head: it serves embeddings only")

    def prepack_weights(self) -> None:
        """Nothing to pack: MKL's sgemm on the plain weights is the fastest here (module docstring)."""

    # ------------------------------------------------------------------ weights

    _RENAMES = {
        "embeddings.word_embeddings": "word_embeddings",
        "embeddings.position_embeddings": "position_embeddings",
        "embeddings.token_type_embeddings": "token_type_embeddings",
        "embeddings.LayerNorm": "embed_norm",
        "attention.output.dense": "attn_out",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "intermediate",
        "output.dense": "out",
        "output.LayerNorm": "out_norm",
    }
    _QKV = ("attention.self.query", "attention.self.key", "attention.self.value")

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        qkv_parts: dict[str, dict[int, torch.Tensor]] = {}
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            if name == "embeddings.position_ids" or name.startswith(("pooler.", "cls.")):
                continue  # a buffer, BERT's own [CLS] pooler and MLM head: not used for embeddings
            target = self._target(name, qkv_parts, tensor)
            if target is None:
                continue
            copy_checked(params, target, tensor, name, self.config.architecture)
            loaded.add(target)
        for target, parts in qkv_parts.items():
            if len(parts) != 3:
                raise ValueError(f"{target}: query, key and value are not all in the checkpoint")
            params[target].copy_(torch.cat([parts[i] for i in range(3)]))
            loaded.add(target)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def _target(self, name: str, qkv_parts: dict, tensor: torch.Tensor) -> str | None:
        """The parameter a checkpoint name fills (None: collected for the fused QKV)."""
        if name.startswith("encoder.layer."):
            _, _, index, rest = name.split(".", 3)
            for part, prefix in enumerate(self._QKV):
                if rest.startswith(prefix + "."):
                    target = f"layers.{index}.qkv.{rest[len(prefix) + 1:]}"
                    qkv_parts.setdefault(target, {})[part] = tensor
                    return None
            module, _, leaf = rest.rpartition(".")
            return f"layers.{index}.{self._RENAMES.get(module, module)}.{leaf}"
        module, _, leaf = name.rpartition(".")
        return f"{self._RENAMES.get(module, module)}.{leaf}"
