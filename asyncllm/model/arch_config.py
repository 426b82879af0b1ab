"""LlamaFamilyConfig: the few numbers our Llama-family model needs, from any HF config;
EncoderConfig: the same for BERT-style encoders (embedding models).

Read from a transformers `PretrainedConfig` so that defaults of each model type
apply, and written to tolerate both transformers 4 (`rope_theta` + `rope_scaling`)
and 5 (`rope_parameters`).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Any

from asyncllm.model.vision_config import VisionConfig, text_architecture


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-dimension divisors of the frequencies, as a Llama 3.1+ GGUF stores them (`rope_freqs`:
    # llama.cpp's convert writes the llama3 scaling this way); applied after `rope_type`.
    freq_factors: tuple[float, ...] | None = None
    # "longrope" (Phi-3): frequencies divided by short_factor while a sequence fits
    # original_max_position_embeddings, by long_factor once it is longer (transformers then
    # recomputes the whole sequence; so does the scheduler: SchedulerConfig.long_rope_from);
    # cos/sin times attention_factor either way.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0

    @property
    def long_rope_from(self) -> int | None:
        """LongRoPE with long factors: sequences longer than this run on them (None: no switch)."""
        return self.original_max_position_embeddings if self.long_factor is not None else None


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): each token's `top_k` experts by
    the router's softmax, their outputs weighted by those probabilities (renormalised over the
    top k where `normalize_top_k`), plus an always-on shared expert gated by a sigmoid (Qwen2-MoE)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    normalize_top_k: bool
    shared_expert_intermediate_size: int = 0  # 0: none
    sparse_layers: tuple[bool, ...] = ()  # which layers have experts (the others a dense MLP)


@dataclass(frozen=True)
class LlamaFamilyConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: q/k/v projections have a bias
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before rotary
    mlp_bias: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    # Gemma 3 (gemma.py); the defaults are the Llama family's.
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh"
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    # Which layers attend within sliding_window (None: all of them, as Mistral), and the rope of
    # those layers where it differs from the global ones' (Gemma 3: base 10000 against 1e6).
    sliding_layers: tuple[bool, ...] | None = None
    local_rope: RopeConfig | None = None
    embedding_multiplier: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    attention_softcapping: float | None = None  # Gemma 2: the same on attention scores
    moe: MoEConfig | None = None  # mixture-of-experts MLPs (layers/moe.py)
    vision: VisionConfig | None = None  # LLaVA: the vision tower and projector of image prompts (llava.py)
    is_encoder_only = False  # a decoder: causal attention over a paged KV cache

    def layer_sliding_window(self, layer: int) -> int | None:
        if self.sliding_layers is not None and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, config: Any, architecture: str) -> "LlamaFamilyConfig":
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        eos = getattr(config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        sliding_window = getattr(config, "sliding_window", None)
        if architecture.startswith("Qwen") and not getattr(config, "use_sliding_window", False):
            sliding_window = None
        extra = _gemma_fields(config, architecture) if architecture in _GEMMA_ARCHITECTURES else {}
        if architecture in _MOE_ARCHITECTURES:
            extra["moe"] = _moe_config(config, architecture)
        hidden_act = extra.get("hidden_act") or getattr(config, "hidden_act", "silu")
        if hidden_act != "silu" and architecture not in _GEMMA_ARCHITECTURES:
            raise ValueError(f"{architecture} with hidden_act={hidden_act!r} is not supported (only silu)")
        rope = extra.pop("rope", None) or _rope_from_hf(config)
        max_positions = getattr(config, "max_position_embeddings", 4096)
        if rope.rope_type == "longrope" and rope.long_factor is None:  # only the short factors' range
            max_positions = min(max_positions, rope.original_max_position_embeddings)
        return cls(
            architecture=architecture,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=max_positions,
            rope=rope,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=(bool(getattr(config, "attention_bias", False)) or architecture == "Qwen2ForCausalLM"
                            or (architecture == "Qwen2MoeForCausalLM" and bool(getattr(config, "qkv_bias", True)))),
            qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_window=sliding_window,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(config, "bos_token_id", None),
            **extra,
        )


_MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def _moe_config(config: Any, architecture: str) -> MoEConfig:
    layers = config.num_hidden_layers
    if architecture == "MixtralForCausalLM":  # every layer sparse, top-k always renormalised
        return MoEConfig(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok,
                         intermediate_size=config.intermediate_size, normalize_top_k=True,
                         sparse_layers=(True,) * layers)
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    sparse = tuple(i not in dense and config.num_experts > 0 and (i + 1) % step == 0 for i in range(layers))
    shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0) if architecture == "Qwen2MoeForCausalLM" else 0
    return MoEConfig(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                     intermediate_size=config.moe_intermediate_size, normalize_top_k=bool(config.norm_topk_prob),
                     shared_expert_intermediate_size=shared, sparse_layers=sparse)


_GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


def _gemma_fields(config: Any, architecture: str) -> dict[str, Any]:
    """Gemma 2's and 3's differences from the Llama family, from their transformers configs
    (refusing bidirectional attention, which is not built)."""
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{architecture} with use_bidirectional_attention (an embedding model) is not supported")
    hidden_act = getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"
    if hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"{architecture} with hidden_activation={hidden_act!r} is not supported (gelu_pytorch_tanh)")
    layer_types = list(config.layer_types)
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"{architecture} layer types {sorted(unknown)} are not supported")
    if architecture == "Gemma3ForCausalLM":  # a rope per layer type
        per_type = dict(getattr(config, "rope_parameters", None) or {})
        ropes = dict(rope=_rope_from_hf(config, per_type["full_attention"]),
                     local_rope=_rope_from_hf(config, per_type["sliding_attention"]))
    else:
        ropes = dict(rope=_rope_from_hf(config))
    return dict(
        hidden_act=hidden_act,
        attention_scale=float(config.query_pre_attn_scalar) ** -0.5,
        sliding_layers=tuple(t == "sliding_attention" for t in layer_types),
        embedding_multiplier=float(config.hidden_size) ** 0.5,
        final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
        attention_softcapping=getattr(config, "attn_logit_softcapping", None),
        **ropes,
    )


def _rope_from_hf(config: Any, params: dict[str, Any] | None = None) -> RopeConfig:
    """The rope of `config` (or of one layer type's `params`, as Gemma 3 gives them)."""
    if params is None:
        params = dict(getattr(config, "rope_parameters", None) or {})
        scaling = getattr(config, "rope_scaling", None)
        if isinstance(scaling, dict):
            params = {**scaling, **params}
    params = dict(params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "su":  # Phi-3's first name for it
        rope_type = "longrope"
    if rope_type not in ("default", "linear", "llama3", "longrope"):
        raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3, longrope)")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (rotary over the whole head only)")
    original = int(params.get("original_max_position_embeddings",
                              getattr(config, "original_max_position_embeddings", None) or 8192))
    extra = {}
    if rope_type == "longrope":
        # transformers' _compute_longrope_parameters: the attention factor from the context extension.
        factor = params.get("factor") or getattr(config, "max_position_embeddings", original) / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        long = params.get("long_factor")
        extra = dict(short_factor=tuple(float(f) for f in params["short_factor"]),
                     long_factor=tuple(float(f) for f in long) if long else None, attention_factor=float(attention))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        **extra,
    )


@dataclass(frozen=True)
class EncoderConfig:
    """A BERT-style encoder: bidirectional attention over each whole sequence, no KV cache."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    hidden_act: str
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    is_encoder_only = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @classmethod
    def from_hf(cls, config: Any, architecture: str) -> "EncoderConfig":
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"{architecture} with position_embedding_type={position_type!r} is not supported "
                             "(only absolute)")
        hidden_act = getattr(config, "hidden_act", "gelu")
        if hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{architecture} with hidden_act={hidden_act!r} is not supported (gelu)")
        return cls(
            architecture=architecture,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            layer_norm_eps=config.layer_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=getattr(config, "type_vocab_size", 2),
            hidden_act=hidden_act,
        )


def config_from_hf(config: Any, architecture: str) -> LlamaFamilyConfig | EncoderConfig:
    """The normalised config of a registered architecture."""
    from asyncllm.model.registry import ENCODER_ARCHITECTURES

    if architecture in ENCODER_ARCHITECTURES:
        return EncoderConfig.from_hf(config, architecture)
    if architecture == "LlavaForConditionalGeneration":  # its text_config's decoder, with a vision tower
        text = LlamaFamilyConfig.from_hf(config.text_config, text_architecture(config))
        return replace(text, architecture=architecture, vision=VisionConfig.from_hf(config))
    return LlamaFamilyConfig.from_hf(config, architecture)
