"""Which HF architectures we run: config.json's `architectures` name → the model class.

Classes are imported when first built (a registry entry costs nothing until used). Every
class implements the model interface (model/interface.py) and is built with a
`ModelContext` (the op choice and the parallel context).
"""
from __future__ import annotations

import importlib

# The dense Llama family shares one implementation; the differences (qkv bias, q/k norm,
# sliding window, Phi-3's fused checkpoint tensors and longrope) are flags of LlamaFamilyConfig.
# Gemma 2 and 3 subclass it (gemma.py: their norms, embedding scale and per-layer-type attention).
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    "MistralForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    "Qwen2ForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    "Qwen3ForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    "Phi3ForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    "Gemma2ForCausalLM": ("asyncllm.model.gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("asyncllm.model.gemma", "GemmaForCausalLM"),
    # Mixture of experts: the same decoder with SparseMoeBlock MLPs (layers/moe.py).
    "MixtralForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    "Qwen2MoeForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    "Qwen3MoeForCausalLM": ("asyncllm.model.llama", "LlamaFamilyForCausalLM"),
    # Image prompts: the Llama-family decoder with a CLIP / SigLIP vision tower (llava.py).
    "LlavaForConditionalGeneration": ("asyncllm.model.llava", "LlavaForConditionalGeneration"),
    # Encoders (embedding models; sentence-transformers folders).
    "BertModel": ("asyncllm.model.bert", "BertEncoder"),
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)
ENCODER_ARCHITECTURES = frozenset({"BertModel"})


class UnsupportedArchitectureError(ValueError):
    pass


def resolve_architecture(architectures: list[str]) -> str:
    for name in architectures:
        if name in _MODELS:
            return name
    raise UnsupportedArchitectureError(
        f"unsupported model architecture {architectures or '(none given)'}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def model_class(architecture: str) -> type:
    module, name = _MODELS[resolve_architecture([architecture])]
    return getattr(importlib.import_module(module), name)


def build_model(config, dtype, device, ctx=None):
    """The model with uninitialised weights of `dtype` on `device` (load_weights fills them)."""
    import torch

    from asyncllm.model.interface import CausalLM, ModelContext

    cls = model_class(config.architecture)
    # Built on meta: no random init of weights about to be overwritten.
    with torch.device("meta"):
        model = cls(config, ctx or ModelContext()).to(dtype)
    if not isinstance(model, CausalLM):
        raise TypeError(f"{cls.__name__} does not implement the model interface")
    model = model.to_empty(device=device)
    # Rotary tables are not in checkpoints: computed on the real device, in fp32 (Gemma 3 has two).
    from asyncllm.model.layers.rotary import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    return model
