"""Loading a checkpoint: an HF folder (config.json + *.safetensors + tokenizer) or a GGUF file.

Either way the result is a `Checkpoint`: the architecture's config, the tokenizer, and a
lazy stream of tensors under their transformers names. Untrusted files load only as
safetensors or GGUF; nothing here unpickles.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from asyncllm.model.arch_config import EncoderConfig, LlamaFamilyConfig, config_from_hf
from asyncllm.model.checkpoint_quant import CheckpointQuantization, GroupedWeight, checkpoint_weights, \
    read_quantization_config
from asyncllm.model.default_model import DEFAULT_MODEL_NAME, default_model_path
from asyncllm.model.gguf_blocks import EXACT_BITS, gguf_groups, permute_rows
from asyncllm.model.gguf_file import GGUFFile
from asyncllm.model.interface import is_decoder_projection
from asyncllm.model.registry import resolve_architecture
from asyncllm.model.tokenizer import load_gguf_tokenizer, load_hf_tokenizer
from asyncllm.pooling.config import (
    SentenceTransformersLayout,
    read_sentence_transformers,
)

# A pre-quantised checkpoint's projections may come as GroupedWeight (checkpoint_quant.py).
WeightStream = Iterator[tuple[str, "torch.Tensor | GroupedWeight"]]


@dataclass
class Checkpoint:
    name: str
    path: str
    format: str  # "hf" | "gguf"
    config: LlamaFamilyConfig | EncoderConfig
    tokenizer: PreTrainedTokenizerBase
    # weights(dtype, exact_bits=None): the tensors in the model's dtype; a GGUF's projections stored in a
    # type that `exact_bits`-bit blocks hold exactly come as GroupedWeight (gguf_blocks.py).
    weights: Callable[..., WeightStream]
    # A sentence-transformers folder's pooling and longest input (None: not such a folder).
    sentence_transformers: SentenceTransformersLayout | None = None
    # Trained for Matryoshka truncation (config.json `is_matryoshka` / `matryoshka_dimensions`):
    # None: not; () any size; else the sizes it was trained for.
    matryoshka_dimensions: tuple[int, ...] | None = None
    # A GPTQ / AWQ / compressed-tensors / FP8 folder's quantization_config (None: dense weights, or a GGUF).
    quantization: CheckpointQuantization | None = None
    # A GGUF whose every decoder projection is stored in a type that blocks of these bits hold
    # exactly (gguf_blocks.EXACT_BITS): the bits; else None.
    exact_block_bits: int | None = None


def load_checkpoint(model: str | None, tokenizer_path: str | None = None) -> Checkpoint:
    if model is None:
        path = default_model_path()
        checkpoint = _load_gguf(path, tokenizer_path)
        checkpoint.name = DEFAULT_MODEL_NAME
        return checkpoint
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model {model!r} not found: pass a local HF folder (config.json + *.safetensors) or a .gguf "
            "file (no hub downloads here)")
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"{model}: a model file must be .gguf; for safetensors pass the folder")
        return _load_gguf(model, tokenizer_path)
    ggufs = sorted(glob.glob(os.path.join(model, "*.gguf")))
    if not os.path.isfile(os.path.join(model, "config.json")) and len(ggufs) == 1:
        return _load_gguf(ggufs[0], tokenizer_path)
    return _load_hf_folder(model, tokenizer_path)


# ----------------------------------------------------------------------------- HF folders

def _load_hf_folder(path: str, tokenizer_path: str | None) -> Checkpoint:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path} has no config.json: not a HF model folder")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}/config.json cannot be read: {exc}") from None
    architecture = resolve_architecture(getattr(hf_config, "architectures", None) or [])
    config = config_from_hf(hf_config, architecture)
    config = _with_generation_eos(config, path)
    files = _safetensors_files(path)
    tokenizer = load_hf_tokenizer(tokenizer_path or path)

    quantization = read_quantization_config(_as_dict(getattr(hf_config, "quantization_config", None)))
    if quantization is not None and isinstance(config, EncoderConfig):
        raise ValueError(f"{path}: a {quantization.method} encoder is not supported (decoder models only)")

    def tensors() -> WeightStream:
        from safetensors import safe_open

        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    def weights(dtype: torch.dtype, exact_bits: int | None = None) -> WeightStream:
        stream = tensors() if quantization is None else checkpoint_weights(tensors(), quantization)
        for name, tensor in stream:
            yield name, tensor if isinstance(tensor, GroupedWeight) else tensor.to(dtype)

    return Checkpoint(os.path.basename(os.path.normpath(path)), path, "hf", config, tokenizer, weights,
                      read_sentence_transformers(path), _matryoshka_dimensions(hf_config), quantization)


def _as_dict(config) -> dict | None:
    """transformers keeps quantization_config as a dict, or as its own config object."""
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict()


def _matryoshka_dimensions(hf_config) -> tuple[int, ...] | None:
    sizes = getattr(hf_config, "matryoshka_dimensions", None)
    if sizes:
        return tuple(int(d) for d in sizes)
    return () if getattr(hf_config, "is_matryoshka", False) else None


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in shard_names]
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
        hint = " (found pickle checkpoints, which are never loaded: convert them to safetensors)" if pickled else ""
        raise ValueError(f"{path} has no *.safetensors weights{hint}")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"{path}: shards listed in the index are missing: {missing}")
    return files


def _with_generation_eos(config, path: str):
    """generation_config.json may list more EOS ids than config.json (e.g. Llama 3 chat)."""
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_path):
        return config
    with open(gen_path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return config
    ids = tuple(eos) if isinstance(eos, list) else (eos,)
    merged = tuple(dict.fromkeys(config.eos_token_ids + ids))
    return dataclasses.replace(config, eos_token_ids=merged)


# ----------------------------------------------------------------------------- GGUF

# GGUF architecture → (transformers model_type, architecture class name).
_GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma's four norms per layer (llama.cpp's names; `ffn_norm` is the pre-feed-forward one there).
_GGUF_GEMMA_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_hf_config(gguf: GGUFFile):
    """The transformers config a GGUF file's metadata describes."""
    from transformers import AutoConfig

    arch = gguf.architecture
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_GGUF_ARCHITECTURES)}")
    model_type, class_name = _GGUF_ARCHITECTURES[arch]
    md = gguf.metadata

    def get(key: str, default=None):
        return md.get(f"{arch}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = md.get("tokenizer.ggml.tokens")
    vocab_size = int(get("vocab_size", len(tokens) if tokens is not None else 0))
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(get("attention.head_count_kv", num_heads)),
        max_position_embeddings=int(get("context_length", 4096)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        architectures=[class_name],
    )
    head_dim = get("attention.key_length")
    if head_dim is not None:
        kwargs["head_dim"] = int(head_dim)
    if arch in ("gemma2", "gemma3"):
        # As transformers reads a Gemma 2 / 3 GGUF: the (global layers') rope base from the file,
        # the layer pattern, Gemma 3's local rope base and the query scale from the config's
        # defaults (as llama.cpp hard-codes them per architecture); Gemma 2's soft-caps from the
        # file where it has them (llama.cpp writes them; transformers takes its defaults, the same
        # 50 and 30 for the published models).
        kwargs.update(rope_theta=float(get("rope.freq_base", 1000000.0 if arch == "gemma3" else 10000.0)),
                      sliding_window=int(get("attention.sliding_window", 4096)))
        if arch == "gemma2":
            for key in ("attn_logit_softcapping", "final_logit_softcapping"):
                if get(key) is not None:
                    kwargs[key] = float(get(key))
        return AutoConfig.for_model(model_type, **kwargs), class_name
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    if get("rope.scaling.type") == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if arch in ("qwen2",):
        kwargs["attention_bias"] = True
    config = AutoConfig.for_model(model_type, **kwargs)
    # Set after construction: transformers 4 reads rope_theta/rope_scaling, 5 reads rope_parameters.
    config.rope_parameters = rope
    config.rope_theta = rope["rope_theta"]
    return config, class_name


def _reverse_llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of Q/K rows, back to transformers' rotate-half layout."""
    dim = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, dim, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_to_hf_name(name: str, architecture: str = "llama") -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    layer_names = _GGUF_GEMMA_LAYER_NAMES if architecture in ("gemma2", "gemma3") else _GGUF_LAYER_NAMES
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in layer_names:
            return f"model.layers.{layer}.{layer_names[rest]}"
    return None


def _load_gguf(path: str, tokenizer_path: str | None) -> Checkpoint:
    gguf = GGUFFile(path)
    hf_config, class_name = gguf_hf_config(gguf)
    architecture = resolve_architecture([class_name])
    config = LlamaFamilyConfig.from_hf(hf_config, architecture)
    tokenizer = load_hf_tokenizer(tokenizer_path) if tokenizer_path else load_gguf_tokenizer(path)
    permute = gguf.architecture in ("llama", "mistral")
    # llama.cpp's convert stores Gemma's norm weights as 1 + w: back to transformers' w (as its GGUF
    # loader does, in fp32), so that every checkpoint reaches the model alike.
    gemma_norms = gguf.architecture in ("gemma2", "gemma3")
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1+: the llama3 scaling as per-dimension factors
        factors = gguf.load("rope_freqs.weight", torch.float32).flatten()
        if factors.numel() != config.head_dim // 2 or not bool((factors > 0).all()):
            raise ValueError(f"{path}: rope_freqs has {factors.numel()} factors (all > 0 expected), "
                             f"the model's head_dim {config.head_dim} needs {config.head_dim // 2}")
        config = dataclasses.replace(config, rope=dataclasses.replace(config.rope,
                                                                      freq_factors=tuple(factors.tolist())))

    def weights(dtype: torch.dtype, exact_bits: int | None = None) -> WeightStream:
        for name in gguf.tensors:
            if name == "rope_freqs.weight":
                continue  # read above, into the config
            hf_name = gguf_to_hf_name(name, gguf.architecture)
            if hf_name is None:
                raise ValueError(f"{path}: unexpected GGUF tensor {name!r}")
            info = gguf.tensors[name]
            bits = EXACT_BITS.get(info.qtype) if exact_bits is not None else None
            # The embedding too where 8-bit blocks hold it (Q8_0, Q5_0): the logits' 8-bit copy, and
            # the lookup table itself under quantized_weights_only, with no fp32 copy made on the way.
            if bits is not None and ((bits == exact_bits and is_decoder_projection(hf_name))
                                     or (bits == 8 and hf_name == "model.embed_tokens.weight")):
                groups = gguf_groups(gguf.raw(name), info.qtype, info.shape)
                if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = config.num_heads if hf_name.endswith("q_proj.weight") else config.num_kv_heads
                    order = _reverse_llama_permute(torch.arange(info.shape[0]), heads)
                    groups = permute_rows(groups, order)
                yield hf_name, GroupedWeight(groups)
                gguf.release_pages(name)  # the groups are a copy
                continue
            tensor = gguf.load(name, torch.float32)
            if gemma_norms and hf_name.endswith("norm.weight"):
                tensor = tensor - 1
            if permute and hf_name.endswith("q_proj.weight"):
                tensor = _reverse_llama_permute(tensor, config.num_heads)
            elif permute and hf_name.endswith("k_proj.weight"):
                tensor = _reverse_llama_permute(tensor, config.num_kv_heads)
            yield hf_name, tensor.to(dtype)
            gguf.release_pages(name)  # the model holds its own copy now
        gguf.release_pages()

    gguf.drop_arrays()  # config and tokenizer are built
    name = str(gguf.metadata.get("general.name") or os.path.splitext(os.path.basename(path))[0])
    projection_bits = {EXACT_BITS.get(info.qtype) for tensor_name, info in gguf.tensors.items()
                       if is_decoder_projection(gguf_to_hf_name(tensor_name, gguf.architecture) or "")}
    exact_block_bits = projection_bits.pop() if len(projection_bits) == 1 else None
    return Checkpoint(name, path, "gguf", config, tokenizer, weights, exact_block_bits=exact_block_bits)
